"""The panel's model list: grouped by method, and "Install ... from the catalogue..." (downloads from 127.0.0.1).

Real MRML, Qt stood in (qtfake.py), the module imported afresh with torch unimportable (the
``fresh`` fixture of test_slicer_widget.py): listing the catalogue and installing from it must not
import torch in Slicer's process.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from test_slicer_widget import fresh, gui, tiny_zips, wait_model_job  # noqa: F401 - fixtures and a helper

from MedDiffSegLib.modality import DEFAULT_MODELS


def _combo_entries(combo) -> list[tuple[str, object]]:
    """(text, data) of every item of the model list, separators as ("---", None) (qtfake keeps them)."""
    return [("---", None) if item["separator"] else (item["text"], item["data"]) for item in combo._items]


@pytest.fixture
def tiny_catalogue(tmp_path, monkeypatch, tiny_package, tiny_zips):  # noqa: F811 - the imported fixture
    """A model catalogue that lists the tiny package (not installed), with the real hash and size of its zip."""
    import MedDiffSegLib.registry.catalogue as cat

    entry = cat.catalogue_entry_for(tiny_package.path)
    assert (entry["sha256"], entry["size"]) == (cat.sha256_file(tiny_zips["0.0.1"]), tiny_zips["0.0.1"].stat().st_size)
    path = tmp_path / "catalogue.json"
    path.write_text(json.dumps({"format": 1, "base_url": "https://models.meddiffseg.example/", "packages": [entry]}))
    monkeypatch.setattr(cat, "CATALOGUE_FILE", path)
    monkeypatch.delenv(cat.CATALOGUE_URL_ENV, raising=False)
    return entry


def test_the_model_list_groups_the_packages_by_method(gui, slicer, mrml, module):  # noqa: F811
    from MedDiffSegLib.registry import list_package_infos

    widget = gui.open(module)
    entries = _combo_entries(widget.ui.modelComboBox)
    method_of = {p.name: p.method_name for p in list_package_infos()}
    packages = [(text, data) for text, data in entries if data in method_of]
    assert sorted(data for _, data in packages) == sorted(method_of)
    assert all(text.startswith(f"{method_of[data]}: {data} (") for text, data in packages)
    order = [method_of[data] for _, data in packages]
    assert order == sorted(order) and len(set(order)) >= 3  # one block per method, methods in order
    for (_, a), (_, b) in zip(entries, entries[1:]):  # neighbours of two methods have a separator between them
        if a in method_of and b in method_of and method_of[a] != method_of[b]:
            pytest.fail(f"no separator between the {method_of[a]} and {method_of[b]} groups")
    assert entries[-1] == ("Install from file...", "__install_from_file__")


def test_a_catalogue_package_is_installed_from_the_model_list_in_the_background(
        fresh, gui, slicer, mrml, tiny_catalogue, tiny_zips, monkeypatch):  # noqa: F811
    import MedDiffSegLib.registry.catalogue as cat
    from localserver import LocalFileServer

    from MedDiffSegLib.registry import user_models_dir

    widget = gui.open(fresh.module)
    combo, ui = widget.ui.modelComboBox, widget.ui
    (label, action), = [(t, d) for t, d in combo.items() if str(d).startswith("__install_from_catalogue__")]
    assert label == f"Install tiny-guided 0.0.1 (guided, CT, {tiny_catalogue['size'] / 1e6:.1f} MB) from the catalogue..."
    assert action == "__install_from_catalogue__:tiny-guided" and widget.currentModelName() != action
    with LocalFileServer({"/zips/tiny-guided-0.0.1.zip": tiny_zips["0.0.1"].read_bytes()}, chunk_size=2048,
                         chunk_delay=0.002) as server:
        monkeypatch.setenv(cat.CATALOGUE_URL_ENV, server.url("/zips/"))  # a hospital's mirror
        combo.activate(combo.findData(action))
        assert widget._modelJob is not None and ui.modelInstallProgressBar.visible
        assert "Installing tiny-guided from the catalogue" in ui.modelDetailsLabel.text
        assert ui.installModelUrlButton.text == "Cancel download"  # the panel stays usable meanwhile
        seen = []
        while widget._modelJob is not None:
            widget._modelTimer.fire()
            seen.append(ui.modelInstallProgressBar.value)
            time.sleep(0.01)
    assert not gui.errors, gui.errors
    assert server.requests == ["/zips/tiny-guided-0.0.1.zip"]
    assert len(set(seen)) > 2 and max(seen) == 1000  # progress moved while it ran
    assert "Installed model tiny-guided 0.0.1" in ui.modelDetailsLabel.text and not ui.modelInstallProgressBar.visible
    assert combo.currentData == "tiny-guided" and (user_models_dir() / "tiny-guided" / "model.json").is_file()
    assert not [d for _, d in combo.items() if str(d).startswith("__install_from_catalogue__")]  # installed now
    assert fresh.blocker.attempts == [] and fresh.torch_free() == []


def test_a_failed_catalogue_install_says_why_and_installs_nothing(fresh, gui, slicer, mrml, tiny_catalogue,
                                                                  monkeypatch):  # noqa: F811
    import MedDiffSegLib.registry.catalogue as cat

    from MedDiffSegLib.registry import user_models_dir

    with socket.socket() as s:  # a port nothing listens on: no network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(cat.CATALOGUE_URL_ENV, f"http://127.0.0.1:{port}/")
    widget = gui.open(fresh.module)
    combo = widget.ui.modelComboBox
    before = widget.currentModelName()
    assert before in DEFAULT_MODELS.values()
    combo.activate(combo.findData("__install_from_catalogue__:tiny-guided"))
    assert widget.currentModelName() is None  # the action item is no model
    wait_model_job(widget)
    (error, _), = gui.errors
    assert "cannot download" in error and "refused" in error and cat.CATALOGUE_URL_ENV in error
    assert not (user_models_dir() / "tiny-guided").exists()
    assert not [p for p in user_models_dir().iterdir()] if user_models_dir().is_dir() else True
    assert combo.findData("__install_from_catalogue__:tiny-guided") >= 0  # still offered
    assert widget.currentModelName() == before  # the model chosen before is chosen again
    assert fresh.blocker.attempts == [] and fresh.torch_free() == []
