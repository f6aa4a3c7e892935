"""Model parts every task uses: timm encoders and residual 3D blocks."""
