"""docs/api.md's table of service settings lists exactly the settings the services take."""

from __future__ import annotations

import re
from pathlib import Path

from services.settings import SETTINGS, all_fields

API_DOC = Path(__file__).parents[2] / "docs" / "api.md"


def test_the_settings_table_matches_the_settings_model():
    table = r"^\| `(\w+)` \| `--([\w-]+)` \| `CAI_<SERVICE>_(\w+)` \| [^|]* \| ([^|]*) \|"
    rows = re.findall(table, API_DOC.read_text(), re.M)
    documented = {name for name, *_ in rows}
    assert documented == set(all_fields())
    for name, flag, env, _ in rows:
        assert flag == name.replace("_", "-") and env == name.upper()
    # a setting only some services take says which
    descriptions = {name: description for name, _, _, description in rows}
    for name in documented:
        takers = [service for service, cls in SETTINGS.items() if name in cls.model_fields]
        if len(takers) < len(SETTINGS):
            assert descriptions[name].startswith(" and ".join(takers) + ":"), name
