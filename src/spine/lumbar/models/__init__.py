"""The lumbar models: the keypoint heatmap localizer and the severity classifiers."""
