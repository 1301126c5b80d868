"""What every method and loop of ntkfast stands on: argument checks (``checks``), the prunable
targets and the ``_orig`` / ``_mask`` re-parametrisation (``targets``), functional state and model
copies (``state``), batches and unlabelled inputs (``batches``, ``unlabelled``), numerics
(``numerics``), the machine's description (``machine``), the progress bars (``progress``), the
locks that make public calls thread-safe (``concurrency``), how files are written and checked
(``files``), which weights ``exclude=`` keeps dense (``exclude``), the names of ``torch.compile``'d
models (``compiled``) and the Literal types of the string options (``options``).
Nothing here imports anything else of the package but ``ntkfast.core`` itself."""
