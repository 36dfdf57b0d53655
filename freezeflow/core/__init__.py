"""The core: pure functions over data and params, importing only torch, torchvision, numpy, Pillow and
PyYAML (enforced by import-linter, see pyproject.toml). errors, params, layout and io are its base."""
