"""What every method and loop of ntkfast stands on: argument checks (``checks``), the prunable
targets and the ``_orig`` / ``_mask`` re-parametrisation (``targets``), functional state and model
copies (``state``), batches and unlabelled inputs (``batches``, ``unlabelled``), numerics
(``numerics``), the machine's description (``machine``) and the progress line (``progress``).
Nothing here imports anything else of the package but ``ntkfast.core`` itself."""
