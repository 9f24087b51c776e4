"""What trains a model: the SDSAT, adapter and speculator trainers, their configs and recipes,
and the tiny counting model of the tests (data preparation lives in models/training/data)."""
