"""The preference store and the web app on a real PostgreSQL server, started here from the installed
Debian binaries (initdb + pg_ctl in a temporary directory, a free loopback port); skipped with the
reason when they are not installed."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile

import pytest
from test_store import exercise_store
from web_support import free_port

from rlhfkit.feedback.store import Store


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip(
            "PostgreSQL server binaries not found (apt-get install postgresql; make test does it where apt works)"
        )
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install -e '.[dev]'")
    run_as: list[str] = []
    tmp = tempfile.mkdtemp(prefix="rlhfkit-pg-")
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres (or nobody) user
        user = "postgres" if _has_user("postgres") else "nobody"
        shutil.chown(tmp, user)
        run_as = ["runuser", "-u", user, "--"]
    data, port = os.path.join(tmp, "data"), free_port()
    subprocess.run(
        run_as + [initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"], check=True, capture_output=True
    )
    subprocess.run(
        run_as
        + [
            pg_ctl,
            "-D",
            data,
            "-w",
            "-l",
            os.path.join(tmp, "log"),
            "-o",
            f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(run_as + [pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_store_on_postgresql(postgres_url):
    store = Store(postgres_url)
    assert store.engine.dialect.name == "postgresql"
    exercise_store(store)
    store.close()


def test_web_app_on_postgresql(postgres_url, tiny_path, tmp_path):
    from fastapi.testclient import TestClient
    from web_support import csrf_of, make_run, sign_in

    from rlhfkit.config import ServeConfig
    from rlhfkit.feedback.store import TaskIn
    from rlhfkit.web.app import create_app

    run = make_run(tmp_path, tiny_path)
    app = create_app(ServeConfig(run=str(run), db=postgres_url, precision="fp32"))
    app.state.store.create_user("pg-user", password="password123")
    app.state.store.add_tasks("pg", [TaskIn([{"role": "user", "content": "q"}], ["a", "b"], external_id="1")])
    c = TestClient(app)
    sign_in(c, "pg-user")
    tok = csrf_of(c)
    task = c.get("/api/tasks/next").json()["task"]
    while app.state.store.task(task["id"]).batch != "pg":  # the store test's tasks come first
        c.post(f"/api/tasks/{task['id']}/skip", headers={"X-CSRF-Token": tok})
        task = c.get("/api/tasks/next").json()["task"]
    r = c.post(
        f"/api/tasks/{task['id']}/ranking",
        json={"ranks": [1, 0], "idempotency_key": "pg-key-1"},
        headers={"X-CSRF-Token": tok},
    )
    assert r.status_code == 201, r.text
    assert not (run / "feedback.db").exists()  # everything went to PostgreSQL
    assert Store(postgres_url).rankings("pg")[0]["ranks"] == [1, 0]
