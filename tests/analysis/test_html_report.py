"""The HTML report renders in a real headless browser (Debian's Chromium, driven by Playwright), with its
plots, without errors and without fetching anything."""
import shutil

import pytest
import torch

import edgequant as eq
from edgequant.analysis import analyze, html_report, mixed_precision, tensor_histograms
from edgequant.data.mnist import mnist_5k
from edgequant.models.mnist_net import MnistMobileNet

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def page_file(tmp_path_factory):
    torch.manual_seed(0)
    x = mnist_5k()[0][:64]
    model = MnistMobileNet().eval()
    data = list(x.split(16))
    sim = eq.QuantSim(model, x[:1], "w8a8")
    sim.calibrate(data, progress=False)
    report = analyze(sim, None, eval_data=data[:1], progress=False)
    hists = tensor_histograms(sim, [q.name for q in report.worst(4)], data[:1])
    mixed = mixed_precision(model, data, high="w8a8", low="w4a8", eval_data=data[:1], progress=False)
    page = html_report("digits <test>", header={"recipe": "w8a8"}, rows=[{"config": "w8a8", "sqnr_db": report.all_sqnr_db}],
                       sim=sim, analysis=report, histograms=hists, mixed=mixed, files=["model.onnx", "report.html"])
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(page)
    return path, report


def test_the_report_renders_in_headless_chromium(page_file):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "Chromium is missing: `make setup` installs Debian's chromium (apt-get install chromium)"
    path, report = page_file
    errors, requests = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            assert page.title() == "digits <test>"
            svgs = page.locator("svg")
            assert svgs.count() >= 3  # sensitivity chart, histograms, Pareto front
            for i in range(svgs.count()):
                box = svgs.nth(i).bounding_box()
                assert box is not None and box["width"] > 100 and box["height"] > 50
            text = page.inner_text("body")
            for heading in ("Fidelity per configuration", "Sensitivity ranking", "Worst tensors against their grids",
                            "Mixed precision", "Cost model", "Files written"):
                assert heading in text
            assert report.worst(1)[0].name in text
        finally:
            browser.close()
    assert errors == []
    assert requests == [path.as_uri()]  # self-contained: nothing else is fetched
