"""Errors raised for missing or broken datasets: messages say where we looked and what to do."""


class DatasetError(ValueError):
    """A dataset is missing, corrupt or does not have the expected layout."""
