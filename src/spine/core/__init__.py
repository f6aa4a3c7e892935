"""What every task uses: config, paths, DICOM reading and geometry, stage 01 (cache), folds, the training
loop and fold driver, the crop driver, stage 05 (ensemble) and stage 06 (predict). Imports no task package:
a task is reached through ``spine.registry``."""
