"""The application on top: the recipe pipeline and the command line."""
