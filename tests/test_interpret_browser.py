"""The latent browser, loaded from disk in real headless Chromium (skipped without Chromium)."""

import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from test_interpret import planted_tokens, token_latent_setup, word_tokenizer

from hf_deepsae.interpret import (
    ContextWindows,
    LatentScore,
    SamplingConfig,
    build_latent_cache,
    compute_statistics,
    decoder_directions,
    nearest_latents,
    render_browser,
    sample_examples,
)

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
                None)
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="needs Chromium (apt-get install chromium)")


class Elements(HTMLParser):
    """Every start tag of a document as `(tag, attributes)`, and the text of `id`-ed `p`/`td`s."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text_of: dict[str, str] = {}
        self._open_ids: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if "id" in attributes and tag in ("p", "td"):
            self._open_ids.append(attributes["id"])
            self.text_of[attributes["id"]] = ""

    def handle_endtag(self, tag):
        if self._open_ids and tag in ("p", "td"):
            self._open_ids.pop()

    def handle_data(self, data):
        for element_id in self._open_ids:
            self.text_of[element_id] += data

    def find(self, tag: str, css_class: str | None = None, **attributes: str):
        return [attrs for name, attrs in self.tags if name == tag
                and (css_class is None or css_class in (attrs.get("class") or "").split())
                and all(attrs.get(key.replace("_", "-")) == value
                        for key, value in attributes.items())]


def dump_dom(url: str, profile) -> str:
    """The DOM after scripts ran, from headless Chromium with a fresh profile and no network."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", f"--user-data-dir={profile}", "--dump-dom", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return result.stdout


@pytest.fixture(scope="module")
def browser_file(tmp_path_factory):
    model, sae = token_latent_setup()
    with torch.no_grad():  # decoder directions: 2 is near 0; the dead ones near 1, then 2
        sae.W_dec[2] = torch.nn.functional.normalize(sae.W_dec[0] + sae.W_dec[2], dim=0)
        sae.W_dec[3:] = torch.nn.functional.normalize(sae.W_dec[1] + 0.5 * sae.W_dec[2], dim=0)
    cache = build_latent_cache(model, sae, planted_tokens())
    statistics = compute_statistics(cache)
    neighbours = nearest_latents(decoder_directions(sae), 2, candidates=~statistics.dead)
    windows = ContextWindows(cache, 4)
    config = SamplingConfig(example_ctx_len=4, n_top=2, n_quantiles=2, n_per_quantile=2)
    examples = [sample_examples(windows, latent, config, statistics.top_tokens_of(latent),
                                neighbours) for latent in (0, 2, 5)]
    scores = [LatentScore(0, "scored", 5 / 64, 0.3, explanation="the token w10", recall=1.0,
                          specificity=0.5, balanced_accuracy=0.75, accuracy=0.65,
                          recall_per_quantile=[1.0, None]),
              LatentScore(5, "dead", 0.0, 0.0)]
    path = tmp_path_factory.mktemp("browser") / "browser.html"
    render_browser(path, examples, statistics, word_tokenizer(), scores, neighbours,
                   info={"hookpoint": "model.embed_tokens"})
    return path



def test_browser_shows_latents_examples_quantiles_neighbours_and_statistics(browser_file, tmp_path):
    dom = Elements(dump_dom(browser_file.as_uri(), tmp_path / "profile"))
    assert dom.find("body", data_ready="true"), "the page script did not run"
    assert [s["data-latent"] for s in dom.find("section", "latent")] == ["0", "2", "5"]
    assert dom.text_of["shown"] == "3 of 3 latents shown"
    assert dom.text_of["n-dead"].startswith("5 ")
    shaded = [span for span in dom.find("span", "token") if "background-color" in
              (span.get("style") or "")]
    assert {span["data-activation"] for span in shaded} == {"4", "3", "1"}
    assert len(dom.find("details", "quantile")) == 6  # 2 bins x 3 latents
    assert dom.find("div", "top") and dom.find("div", "same-token")
    # neighbours among live latents (0: [2, 1], 2: [0, 1], 5: [1, 2]), linked when on the page
    assert [a["data-latent"] for a in dom.find("a", "neighbour")] == ["2", "0", "2"]
    assert len(dom.find("span", "neighbour", data_latent="1")) == 3
    assert dom.find("span", "badge", **{"class": "badge dead"})
    assert len(dom.find("span", "badge", **{"class": "badge single-token"})) == 1
    assert dom.find("table", "scores", data_status="scored")
    assert dom.find("table", "scores", data_status="dead")


def test_browser_filter_is_set_from_the_url(browser_file, tmp_path):
    dom = Elements(dump_dom(browser_file.as_uri() + "?q=w13", tmp_path / "profile"))
    hidden = {s["data-latent"]: "hidden" in s for s in dom.find("section", "latent")}
    assert hidden == {"0": True, "2": False, "5": True}  # w13 is a top token of latent 2 only
    assert dom.text_of["shown"] == "1 of 3 latents shown"
