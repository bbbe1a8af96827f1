"""The data layer's one error type: messages name the file, option or field and what would be valid."""


class DataError(ValueError):
  """A corpus, dataset directory or data option is unusable."""
