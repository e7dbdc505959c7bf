"""Preprocessing stage: source images (BraTS NIfTI, 2D image/mask folders) -> Zarr v3 store + Parquet manifest."""
