"""One module per data set family; each registers its data sets in
jrcl_fast.registry.DATASETS on import (see jrcl_fast/data/catalog.py)."""
