"""RSNA 2024 Lumbar Spine Degenerative Classification: the task, its generator, the level localizer
(stage 02), the crops (03), the severity classifiers (04) and the overlays."""
