"""One training loop for every model of the repo (localizer, segmenter, classifiers)."""
