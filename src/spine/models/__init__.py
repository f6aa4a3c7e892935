"""Models by name: timm backbones inside the repo's own heads."""
