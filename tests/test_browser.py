"""The /demo page and /docs in a real browser: Debian's chromium driven by selenium, against a real server process.

Chromium's fake camera plays a Y4M video made here from a shared photo (one person's head moving across the
frame). The test enrols that person through the page's own "Enrol this face" form (the page grabs the current
camera frame and posts it to /enroll), then waits for the page to draw the person's name on the face it tracks
over /stream. Screenshots go to artifacts/browser/. /docs must list the operations with every host but this
server unreachable (--host-resolver-rules), as on a machine without internet.

Needs chromium and chromium-driver (Debian packages): installed here with apt-get when missing and running as
root; skipped with the reason otherwise. Bounded: each wait has its own timeout, the whole file about a minute.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from server_process import Server, running_server

from benchmarks.video_scene import head_patch, moving_heads, write_y4m

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (test extra)")
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "artifacts" / "browser"
PERSON_PHOTO = "pairs/img21.jpg"
PERSON_NAME = "Grace Hopper"
APT_TIMEOUT_S = 600


def _browser_binaries() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages when missing and possible."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found  # type: ignore[return-value]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium and chromium-driver are not installed, and cannot be here (needs root and apt-get): "
                    "apt-get install chromium chromium-driver")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT_S, check=False)
    if result.returncode != 0:  # a fresh machine may not have the package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=APT_TIMEOUT_S, check=False)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT_S, check=False)
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        pytest.skip(f"could not install chromium and chromium-driver with apt-get:\n{result.stderr[-1500:]}")
    return found  # type: ignore[return-value]


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory) -> Server:
    with running_server(models_dir, tmp_path_factory.mktemp("browser")) as running:
        yield running


@pytest.fixture(scope="module")
def camera_video(server: Server, faces_dir: Path, tmp_path_factory) -> Path:
    """Two seconds at 15 fps of the person's head swaying across a 640x480 frame, as Y4M."""
    data = (faces_dir / PERSON_PHOTO).read_bytes()
    faces = httpx.post(f"{server.url}/detect", files={"image": ("p.jpg", data)}, timeout=60).json()["faces"]
    box = max(faces, key=lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]))["box"]
    patch = head_patch(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), box, face_width=150)
    frames = [frame for frame, _ in moving_heads([patch], 30)]
    return write_y4m(tmp_path_factory.mktemp("camera") / "person.y4m", frames, fps=15)


@pytest.fixture(scope="module")
def browser(camera_video: Path):
    chromium, chromedriver = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,760",
        "--use-fake-ui-for-media-stream",  # grant the camera without a prompt
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={camera_video}",
        # No host but this machine resolves: a page that needed a CDN would show it here, with or without internet.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    except Exception as exc:  # noqa: BLE001 -- whatever stops chromium from starting here, say what it was
        pytest.skip(f"chromium did not start: {exc}")
    driver.set_page_load_timeout(30)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, seconds: float, what: str, screenshot: str):
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.2).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(SCREENSHOTS / screenshot))
        logs = driver.execute_script("return document.getElementById('status')?.textContent")
        pytest.fail(f"{what} within {seconds} s (page status: {logs!r}); screenshot {SCREENSHOTS / screenshot}")


# The page redraws its boxes on every answer, so they are read in one script call (element handles go stale).
SNAPSHOT_JS = """
const v = document.getElementById("video").getBoundingClientRect();
return {
  video: {x: v.x, y: v.y, width: v.width, height: v.height},
  faces: [...document.querySelectorAll("#faces .face")].map((f) => {
    const r = f.getBoundingClientRect(), name = f.querySelector(".name");
    return {known: f.classList.contains("known"), name: name ? name.textContent : null,
            label: f.querySelector(".label").textContent, x: r.x, y: r.y, width: r.width, height: r.height};
  }),
};
"""


def snapshot(driver) -> dict:
    return driver.execute_script(SNAPSHOT_JS)


def named_face(driver) -> dict | bool:
    """The face box whose label shows the enrolled name, once the page draws one."""
    view = snapshot(driver)
    for face in view["faces"]:
        if face["known"] and face["name"] == PERSON_NAME:
            return {**face, "video": view["video"]}
    return False


def test_the_demo_page_enrols_the_person_on_camera_and_then_names_them(server: Server, browser) -> None:
    browser.get(f"{server.url}/demo")
    first = wait_for(browser, lambda d: snapshot(d)["faces"], 60,
                     "no face box was drawn over the camera video", "demo-no-face.png")
    assert PERSON_NAME not in first[0]["label"]  # nobody is enrolled yet

    browser.find_element(By.ID, "enrol-name").send_keys(PERSON_NAME)
    browser.find_element(By.CSS_SELECTOR, "#enrol button[type=submit]").click()
    wait_for(browser, lambda d: "enrolled" in d.find_element(By.ID, "enrol-result").text, 30,
             "the enrolment did not succeed", "demo-enrol.png")
    listed = httpx.get(f"{server.url}/identities", timeout=10).json()["items"]
    assert [(i["identity_id"], i["display_name"]) for i in listed] == [("grace-hopper", PERSON_NAME)]

    face = wait_for(browser, named_face, 30, f"the page did not name the face {PERSON_NAME!r}", "demo-unnamed.png")
    browser.save_screenshot(str(SCREENSHOTS / "demo.png"))
    # The name sits on a box over the video, where the face is: inside the picture, face-sized.
    video = face["video"]
    assert video["x"] - 1 <= face["x"] and face["x"] + face["width"] <= video["x"] + video["width"] + 1, face
    assert video["y"] - 1 <= face["y"] and face["y"] + face["height"] <= video["y"] + video["height"] + 1, face
    assert 0.1 * video["width"] <= face["width"] <= 0.5 * video["width"], face
    assert float(face["label"].split()[-1]) > 0.5, face  # the similarity it shows
    assert float(browser.find_element(By.ID, "fps").text) > 0
    assert browser.find_element(By.ID, "latency").text.endswith("ms")


def test_docs_list_the_operations_without_the_internet(server: Server, browser) -> None:
    browser.get(f"{server.url}/docs")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")) >= 5, 30,
             "Swagger UI did not list the operations", "docs-empty.png")
    paths = {e.text.replace("\u200b", "") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/detect", "/verify", "/identify", "/enroll", "/identities"} <= paths, paths
    browser.save_screenshot(str(SCREENSHOTS / "docs.png"))

    browser.get(f"{server.url}/redoc")
    wait_for(browser, lambda d: "Find faces in an image" in d.find_element(By.TAG_NAME, "body").text, 30,
             "ReDoc did not render the operations", "redoc-empty.png")
    browser.save_screenshot(str(SCREENSHOTS / "redoc.png"))
