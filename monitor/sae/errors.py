"""The one error every SAE loading and building path raises."""


class SAEError(ValueError):
    """An SAE that cannot be built or loaded, with the file and field at fault."""
