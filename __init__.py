"""The Hub files (:data:`HUB_FILES`), installed as the package acip.hub.

This file exists so that an installed or editable acip can import them as a regular subpackage; a Hub repository
holds only the Hub files themselves, which ``save_pretrained`` copies next to a model's config.json.
"""

# The remote-code files of every saved ACIP model: the one list of them (tests/test_hub_files.py checks the code
# against it, tests/test_docs.py the docs).
HUB_FILES = ("configuration_acip.py", "modeling_acip.py", "parametrization.py", "pruning.py", "fusing.py",
             "quantization.py")
