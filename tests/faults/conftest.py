"""The fault tier: real processes killed mid-write, short writes, hostile and mutated files.

Big scratch files go to the system temporary folder (pytest's ``tmp_path_factory``) and are
deleted when the module finishes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
