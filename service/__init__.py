"""The RefineDet detection HTTP service (FastAPI) and its inference backends."""
