"""AASCE 2019 (SpineWeb dataset 16): Cobb angles from AP spine radiographs via 68 vertebra landmarks."""
