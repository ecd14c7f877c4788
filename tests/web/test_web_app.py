"""The feature browser's pages and API through FastAPI's test client, on a tiny trained run's database."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from midisc.analysis.profiles import similar_features
from midisc.data import lm
from midisc.serve import opener
from midisc.store import Store
from midisc.web.app import create_app
from midisc.web.tryit import TextProbe


@pytest.fixture(scope="module")
def site(trained_run):
    work, run_id = trained_run
    url = f"sqlite:///{work / 'runs.db'}"
    with TestClient(create_app(url, TextProbe(opener(url)))) as client:
        yield client, url, run_id


def test_the_run_list_shows_every_run_with_its_figures(site):
    client, url, run_id = site
    page = client.get("/")
    assert page.status_code == 200
    with Store(url) as store:
        run = store.get_run(run_id)
    row = re.search(rf'<tr data-run="{run_id}" data-status="completed">(.*?)</tr>', page.text, re.S).group(1)
    assert f"{run['fvu']:.3f}" in row and f"{run['l0']:.1f}" in row and run["architecture"] in row
    assert f'href="/runs/{run_id}"' in row
    # Sort links keep the filter and flip the order of the column already sorted.
    assert 'href="/?sort=fvu&amp;desc=1' in page.text and 'href="/?sort=started_at&amp;desc=0' in page.text
    assert f'data-run="{run_id}"' not in client.get("/?status=failed").text
    assert client.get("/api/runs?q=topk").json()["total"] == 1


def test_a_run_page_has_config_curves_histogram_core_figures_and_a_feature_page(site):
    client, url, run_id = site
    page = client.get(f"/runs/{run_id}")
    assert page.status_code == 200
    for part in ('id="curves"', 'id="histogram"', 'id="core"', 'id="feature-list"', "&#34;sae&#34;"):
        assert part in page.text, part
    answer = client.get(f"/api/runs/{run_id}").json()
    with Store(url) as store:
        epochs = store.epoch_metrics(run_id)
        features = store.features(run_id)
    assert answer["curves"]["steps"] == [e["step"] for e in epochs]
    assert sum(answer["histogram"]["counts"]) + answer["histogram"]["never"] == len(features)
    listed = client.get(f"/api/runs/{run_id}/features?sort=max_activation&page=2").json()
    expected = sorted(features, key=lambda f: (-f["max_activation"], f["feature_index"]))[50:100]
    assert [r["feature_index"] for r in listed["rows"]] == [f["feature_index"] for f in expected]
    assert (listed["page"], listed["pages"], listed["total"]) == (2, -(-len(features) // 50), len(features))


def test_features_are_found_by_a_token_of_their_top_examples(site):
    client, url, run_id = site
    with Store(url) as store:
        top = store.feature_examples(run_id, kind="top")
    from collections import Counter

    # A token piece of the tiny tokenizer's that some top examples have and others lack.
    word = Counter(t for e in top for t in set(e["tokens"]) if len(t.strip()) > 1).most_common(3)[-1][0]
    expected = sorted({e["feature_index"] for e in top if any(word in t for t in e["tokens"])})
    found = client.get(f"/api/runs/{run_id}/features", params={"q": word, "sort": "feature_index", "desc": 0}).json()
    assert expected and [r["feature_index"] for r in found["rows"]] == expected[:50]


def test_a_dashboard_shows_the_stored_examples_with_the_max_token_marked(site):
    client, url, run_id = site
    with Store(url) as store:
        stats = store.features(run_id)
        feature = max(range(len(stats)), key=lambda i: stats[i]["frequency"])
        examples = store.feature_examples(run_id, features=[feature])
    shown = client.get(f"/api/runs/{run_id}/features/{feature}").json()
    tops = [e for e in examples if e["kind"] == "top"]
    assert [e["activation"] for e in shown["top"]] == [e["activation"] for e in tops][:10]
    for stored, view in zip(tops, shown["top"]):
        assert [t["max"] for t in view["tokens"]].index(True) == stored["max_token_index"]
        assert [t["text"] for t in view["tokens"]] == stored["tokens"]
    sampled = sum(len(g["examples"]) for g in shown["quantiles"])
    assert sampled == sum(e["kind"] == "quantile" for e in examples)
    html = client.get(f"/runs/{run_id}/features/{feature}").text
    assert html.count('class="tok max"') == len(shown["top"]) + sampled
    assert 'id="density"' in html and 'id="logit-table"' in html and 'id="similar"' in html


def test_the_dashboard_s_neighbours_are_the_saved_sae_s_closest_decoder_directions(site, trained_run):
    client, url, run_id = site
    from midisc.sae import load_sae

    sae = load_sae(trained_run[0] / "out" / "sae")
    indices, cosines = similar_features(sae.W_dec.detach())
    shown = client.get(f"/api/runs/{run_id}/features/5").json()
    assert [j for j, _ in shown["similar"]] == indices[5].tolist()
    assert [c for _, c in shown["similar"]] == pytest.approx(cosines[5].tolist(), abs=1e-4)
    assert len(shown["promoted"]) == len(shown["suppressed"]) == 10 and shown["density"]["heights"]


@pytest.mark.parametrize("path, status, says", [
    ("/runs/999", 404, "no run with id 999; existing ids: 1"),
    ("/runs/1/features/100000", 404, "run 1 has no feature 100000; its features are 0-"),
    ("/runs/one", 404, "run and feature ids are whole numbers"),
    ("/runs/1/features/-1", 404, "run 1 has no feature -1"),
    ("/nowhere", 404, "there is no page /nowhere"),
    ("/runs/1?sort=speed", 400, "sort &#39;speed&#39; is not one of feature_index, frequency"),
    ("/sweep?id=nosuch", 404, "no sweep &#39;nosuch&#39;"),
])
def test_bad_urls_get_a_page_that_says_what_exists(site, path, status, says):
    client, _, _ = site
    page = client.get(path)
    assert page.status_code == status and says in page.text, page.text[-500:]
    assert "<nav>" in page.text  # a page of the site, not a bare error


def test_the_api_answers_errors_in_json(site):
    client, _, _ = site
    answer = client.get("/api/runs/999/features")
    assert answer.status_code == 404 and answer.json() == {"error": "no run with id 999; existing ids: 1"}
    assert client.get("/api/live?ids=1,x").status_code == 400


@torch.inference_mode()
def test_try_a_text_gives_the_sae_codes_of_the_hooked_layer(site, trained_run):
    client, url, run_id = site
    text = "the market rose as shares in the bank fell"
    answer = client.post(f"/api/runs/{run_id}/try", json={"text": text})
    assert answer.status_code == 200, answer.text
    found = answer.json()
    # The same numbers computed by hand: tokenizer, the model cut at the hook, the saved SAE.
    from midisc.sae import load_sae
    from midisc.training.reopen import open_run

    with Store(url) as store:
        recipe = open_run(store, run_id).recipe
    source = recipe.open()
    ids = source.tokens.tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = [source.tokens.bos] if source.tokens.bos is not None else []
    acts = lm.capture(source.model, source.module, torch.tensor([prefix + ids]))[0, len(prefix):]
    codes = load_sae(trained_run[0] / "out" / "sae").encode(acts.float())
    assert [t["text"] for t in found["tokens"]] == source.tokens.decode()(ids)
    feature, peak, position = found["top"][0]
    assert peak == pytest.approx(float(codes.max()), abs=1e-4) and position == int(codes.max(1).values.argmax())
    assert found["values"][str(feature)] == pytest.approx(codes[:, feature].tolist(), abs=1e-4)


@pytest.mark.parametrize("text, says", [("  ", "it is empty"), ("x" * 5000, "5,000 characters; at most 4,000")])
def test_try_a_text_refuses_what_it_cannot_try(site, text, says):
    client, _, run_id = site
    answer = client.post(f"/api/runs/{run_id}/try", json={"text": text})
    assert answer.status_code == 400 and says in answer.json()["error"]


def test_without_a_model_the_try_box_says_it_is_off(trained_run):
    work, run_id = trained_run
    with TestClient(create_app(f"sqlite:///{work / 'runs.db'}", None)) as client:
        assert "Trying texts is off" in client.get(f"/runs/{run_id}/try").text
        answer = client.post(f"/api/runs/{run_id}/try", json={"text": "hello"})
        assert answer.status_code == 400 and "off in this server" in answer.json()["error"]


def test_a_missing_database_says_what_to_run_and_then_shows_the_run(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'later.db'}"
    with TestClient(create_app(url, None)) as client:
        for path in ("/", "/runs/1", "/sweeps"):
            page = client.get(path)
            assert page.status_code == 200 and "No database yet" in page.text and "python -m midisc.train" in page.text
        assert not (tmp_path / "later.db").exists()  # the server never creates it
        with Store(url) as store:
            assert "No runs yet" in client.get("/").text
            run_id = store.start_run(model="m", hook="model.layers.1", layer=1, architecture="topk", config={},
                                     output_dir=str(tmp_path))
            store.add_epoch_metrics(run_id, 0, 12, {"train/loss": 0.5, "val/fvu": 0.25, "val/l0": 8.0})
        page = client.get("/")
        assert f'<tr data-run="{run_id}" data-status="running">' in page.text
        assert client.get("/api/live").json() == [{"id": run_id, "status": "running", "epoch": 0, "step": 12,
                                                   "loss": 0.5, "fvu": 0.25, "l0": 8.0, "dead_frac": None}]
        run_page = client.get(f"/runs/{run_id}")
        assert run_page.status_code == 200 and "not analysed yet" in run_page.text
        assert "has no analysed features yet" in client.get(f"/runs/{run_id}/features/0").text


def test_a_sweep_page_puts_its_jobs_on_the_frontier(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'sweep.db'}"
    with Store(url) as store:
        for k, fvu in ((16, 0.3), (32, 0.2), (64, 0.25)):
            run_id = store.start_run(model="m", hook="h", layer=1, architecture="topk", config={}, output_dir="o",
                                     sweep_id=str(tmp_path / "multirun" / "10-00-00"),
                                     overrides=[f"sae.k={k}", "layer=1"])
            store.finish_run(run_id, "completed", metrics={"fvu": fvu, "l0": float(k)})
    with TestClient(create_app(url, None)) as client:
        listed = client.get("/sweeps").text
        assert "/sweep?id=" in listed
        page = client.get("/sweep?id=10-00-00")
        assert page.status_code == 200 and 'id="frontier"' in page.text
        charts = re.search(r'<script type="application/json" id="charts">(.*?)</script>', page.text, re.S).group(1)
        import json

        points = json.loads(charts)["frontier"]
        assert [(p["overrides"], p["pareto"]) for p in points] == [("sae.k=16", True), ("sae.k=32", True),
                                                                   ("sae.k=64", False)]


def test_explanations_show_on_the_dashboard_and_the_feature_list_finds_them(published):
    _, url, run_id = published
    with Store(url) as store:
        row = store.add_explanation(run_id, 7, explainer="local:tiny", prompt_version="v1",
                                    explanation="words about money", examples={"explain": []})
        store.score_explanation(row, scorer="local:tiny", scores={"detection": 0.75, "fuzzing": 0.5,
                                                                  "baseline_detection": 0.5, "baseline_fuzzing": 0.5})
    with TestClient(create_app(url, None)) as client:
        page = client.get(f"/runs/{run_id}/features/7").text
        assert "“words about money”" in page and "detection 0.75 (shuffled 0.50)" in page
        assert "not explained yet: python -m midisc.autointerp" in client.get(f"/runs/{run_id}/features/8").text
        found = client.get(f"/api/runs/{run_id}/features", params={"q": "MONEY"}).json()
        assert [(r["feature_index"], r["explanation"]) for r in found["rows"]] == [(7, "words about money")]
