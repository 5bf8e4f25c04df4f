"""Tucker-2: 1×1 (M→R_in) → k×k core (R_in→R_out) → 1×1 (R_out→N); tensorly HOOI."""

from __future__ import annotations

import torch

from bscompress.core.padding import pad_options
from bscompress.factorize.gsvd import refit_last
from bscompress.factorize.separable import relative_errors
from bscompress.factorize.tucker import clip_tucker2_ranks, hosvd_spectra
from bscompress.layers.tensor import Tucker2Conv
from bscompress.methods.base import (
    DATA_FREE,
    ConvMethod,
    RankOptions,
    channels,
    plain_view,
    rank_for_energy,
    relative_error,
    round_up,
    set_weight,
)


class Tucker2Method(ConvMethod, name="tucker2"):
    """Tucker-2: 1×1 (M→R_in) → k×k core (R_in→R_out) → 1×1 (R_out→N); tensorly HOOI."""

    layers = (Tucker2Conv,)
    in_auto = True

    def choose(self, conv, options):
        groups = conv.groups
        n_g, m_g = conv.out_channels // groups, conv.in_channels // groups
        if options.energy is not None:
            out_spectrum, in_spectrum = hosvd_spectra(conv.weight, groups)
            r_out = rank_for_energy(out_spectrum, options.energy)
            r_in = rank_for_energy(in_spectrum, options.energy)
        elif options.rank is not None:
            r_out = r_in = options.rank
        else:
            r_out = channels(options.tucker_ranks, n_g)
            r_in = channels(options.tucker_ranks, m_g)
        full_out, full_in = clip_tucker2_ranks(conv.weight.shape, (n_g, m_g), groups)
        r_out = round_up(r_out, options.round_to, full_out)
        r_in = round_up(r_in, options.round_to, full_in)
        return {"out": r_out, "in": r_in}, {"n_iter_max": options.tucker_iters,
                                            **pad_options(conv)}

    #: channel fractions the budget allocator tries (both modes alike)
    FRACTIONS = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)

    def candidates(self, conv, options, errors=True):
        """Ranks at ``FRACTIONS`` of the channels; error = the truncated-HOSVD bound
        e_out(R_out) + e_in(R_in) (HOOI lands below it)."""
        out_spectrum, in_spectrum = hosvd_spectra(conv.weight, conv.groups)
        e_out, e_in = relative_errors(out_spectrum), relative_errors(in_spectrum)
        seen, result = set(), []
        for fraction in self.FRACTIONS:
            ranks, extra = self.choose(conv, RankOptions(tucker_ranks=fraction,
                                                         round_to=options.round_to,
                                                         tucker_iters=options.tucker_iters))
            key = (ranks["out"], ranks["in"])
            if key in seen:
                continue
            seen.add(key)
            error = float(e_out[min(key[0], len(e_out) - 1)] + e_in[min(key[1], len(e_in) - 1)])
            result.append((ranks, extra, min(error, 1.0)))
        return result

    def candidate_options(self, options):
        """A candidate is measured as the truncated HOSVD (no HOOI iteration), the form its
        data-free error (``candidates``) bounds; the chosen one is built with its HOOI
        iterations. One HOOI iteration costs an SVD per mode, about as much as the
        candidate's data-aware fit."""
        if options.get("n_iter_max", 0) == 0:
            return options
        return {**options, "n_iter_max": 0}

    def build(self, conv, entry):
        view, _ = plain_view(conv, entry)
        block = Tucker2Conv.from_conv(view, (entry.ranks["out"], entry.ranks["in"]),
                                      n_iter_max=entry.options.get("n_iter_max", 5))
        return block, relative_error(conv.weight, block.to_dense())

    def structure(self, conv, entry):
        view, _ = plain_view(conv, entry)
        return Tucker2Conv.empty_like(view, (entry.ranks["out"], entry.ranks["in"]))

    def fit_data_aware(self, original, block, cov, weight, als_iters):
        """The last 1×1 (``pw2``) refit by least squares given ``pw1`` and the core."""
        if cov.full is None:
            return DATA_FREE
        g = block.groups
        r_out, r_in = block.ranks
        u_in = block.pw1.weight.detach().double().reshape(g, r_in, -1)
        core = block.core.weight.detach().double().reshape(g, r_out, r_in, -1)
        front = torch.einsum("gosk,gsi->goik", core, u_in).reshape(g, r_out, -1)
        set_weight(block.pw2.weight, refit_last(weight, front, cov.full))
        return "pw2 refit"
