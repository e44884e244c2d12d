"""The training loop and what it needs: config, state, optimizer and schedules, the objective interface,
the generic loader, callbacks. Imports nothing modality-specific (enforced by import-linter)."""
