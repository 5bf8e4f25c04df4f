# bscompress on CPU: docker build -t bscompress . && docker run --rm -v "$PWD:/work" -w /work bscompress inspect torchvision:resnet18
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/bscompress
COPY pyproject.toml README.md LICENSE ./
COPY bscompress ./bscompress
# CPU wheels of torch keep the image small; the pins match pyproject.toml.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
    && pip install .

RUN useradd --create-home bscompress
USER bscompress
WORKDIR /work
ENTRYPOINT ["bscompress"]
CMD ["--help"]
