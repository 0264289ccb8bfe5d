"""docs/api.md's table of service settings lists exactly the settings the services take."""

from __future__ import annotations

import re
from pathlib import Path

from services.settings import ServiceSettings

API_DOC = Path(__file__).parents[2] / "docs" / "api.md"


def test_the_settings_table_matches_the_settings_model():
    rows = re.findall(r"^\| `(\w+)` \| `--([\w-]+)` \| `CAI_<SERVICE>_(\w+)` \|", API_DOC.read_text(), re.M)
    documented = {name for name, _, _ in rows}
    assert documented == set(ServiceSettings.model_fields) | {"port", "metrics_port"}
    for name, flag, env in rows:
        assert flag == name.replace("_", "-") and env == name.upper()
