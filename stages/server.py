"""Run the team's MLflow tracking server and create its PostgreSQL database.

    python -m stages.server create-db [--role NAME] [--database NAME] [--createdb]
    python -m stages.server serve [--host HOST] [--port PORT] [--basic-auth] ...

`make db` and `make server` call these with the Makefile's variables; see
docs/team.md. The server keeps runs in PostgreSQL and serves artifacts from
a local folder (`--serve-artifacts --artifacts-destination`), so clients need
no access to the artifact storage. It listens on 127.0.0.1 unless `--host`
(HOST in the Makefile) sets another address.

By default the server reaches PostgreSQL over its Unix socket as the role
named after the operating-system user that runs it (peer authentication),
so no database password is needed anywhere.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from stages.config import ConfigError
from stages.redaction import mask_uri

log = logging.getLogger("stages.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_DATABASE = "mlflow"
SOCKET_DIR = "/var/run/postgresql"  # Debian's PostgreSQL socket folder
SERVER_DIR = Path("mlserver")
AUTH_CONFIG = "basic_auth.ini"
AUTH_DATABASE = "basic_auth.db"
SECRET_KEY_FILE = "flask_secret_key"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# psql runs this with the variables `role` and `database`; \gexec runs each
# generated statement, so both steps are skipped when their object exists.
CREATE_SQL = r"""
SELECT format('CREATE ROLE %I LOGIN', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role')\gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'database', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database')\gexec
"""
CREATEDB_SQL = r"""
SELECT format('ALTER ROLE %I CREATEDB', :'role')\gexec
"""


def current_user() -> str:
    """Return the name of the operating-system user running this process."""
    return pwd.getpwuid(os.geteuid()).pw_name


def default_backend_uri(
    role: str | None = None,
    database: str = DEFAULT_DATABASE,
    socket_dir: str = SOCKET_DIR,
) -> str:
    """Return the URI of a local database reached over the Unix socket."""
    return f"postgresql://{role or current_user()}@/{database}?host={socket_dir}"


def superuser_prefix(superuser: str = "postgres") -> list[str]:
    """Return the command prefix that runs a program as the database superuser."""
    if current_user() == superuser:
        return []
    if os.geteuid() == 0:
        return ["runuser", "-u", superuser, "--"]
    return ["sudo", "-u", superuser]


def create_database(
    role: str, database: str, createdb: bool = False, superuser: str = "postgres"
) -> None:
    """Create the login role and its database on the local PostgreSQL.

    Existing ones are kept, so running it again changes nothing. With
    `createdb`, the role may also create databases (the tests make a fresh
    database per session).
    """
    sql = CREATE_SQL + (CREATEDB_SQL if createdb else "")
    command = [
        *superuser_prefix(superuser),
        "psql",
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-v",
        f"role={role}",
        "-v",
        f"database={database}",
        "-d",
        "postgres",
        "-f",
        "-",
    ]
    # The superuser may not be allowed into the caller's working folder.
    result = subprocess.run(
        command, input=sql, text=True, capture_output=True, cwd="/", check=False
    )
    if result.returncode != 0:
        raise ConfigError(
            f"Creating role {role!r} and database {database!r} failed: "
            f"{result.stderr.strip() or result.stdout.strip()}. Is PostgreSQL "
            "installed and running (`pg_lsclusters`)?"
        )
    log.info(
        "PostgreSQL role %r and database %r are ready%s",
        role,
        database,
        " (the role may create databases)" if createdb else "",
    )


def write_auth_config(server_dir: Path) -> Path:
    """Write the basic-auth app's config, with its user database in `server_dir`."""
    server_dir.mkdir(parents=True, exist_ok=True)
    path = server_dir / AUTH_CONFIG
    database = (server_dir / AUTH_DATABASE).resolve()
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{database}\n"
        "admin_username = admin\n"
        "authorization_function = "
        "mlflow.server.auth:authenticate_request_basic_auth\n",
        encoding="utf-8",
    )
    return path


def session_secret(server_dir: Path) -> str:
    """Return the key that signs the basic-auth app's CSRF tokens.

    It is made once and kept in SERVER_DIR/flask_secret_key, readable by its
    owner only, so that sessions survive a restart of the server.
    """
    path = server_dir / SECRET_KEY_FILE
    if not path.exists():
        server_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as key_file:
            key_file.write(secrets.token_hex(32))
    return path.read_text(encoding="utf-8").strip()


def server_command(
    backend_store_uri: str,
    artifacts_destination: str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int = 1,
    basic_auth: bool = False,
) -> list[str]:
    """Return the `mlflow server` command line."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        local_or_uri(artifacts_destination),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    if basic_auth:
        command += ["--app-name", "basic-auth"]
    return command


def local_or_uri(location: str | Path) -> str:
    """Return a URI unchanged and a local folder as an absolute path."""
    text = str(location)
    return text if "://" in text else str(Path(text).resolve())


def server_environment(
    server_dir: Path, basic_auth: bool = False, base: dict[str, str] | None = None
) -> dict[str, str]:
    """Return the environment of the server process, built on `base` (default:
    this process's environment).

    MLflow's job runner (for GenAI scorers) is turned off: this project does
    not use it, and it would start several more processes.
    """
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DO_NOT_TRACK"] = "1"
    if basic_auth:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(write_auth_config(server_dir).resolve())
        if not env.get(SECRET_KEY_ENV):
            env[SECRET_KEY_ENV] = session_secret(server_dir)
        first_start = not (server_dir / AUTH_DATABASE).exists()
        if first_start and not env.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
            raise ConfigError(
                "The first start with --basic-auth creates the user 'admin' and "
                "needs its password: set MLFLOW_AUTH_ADMIN_PASSWORD in the "
                "environment (it is not stored in any file)"
            )
    return env


def health_url(host: str, port: int) -> str:
    """Return the URL of the server's health check."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/health"


def start_server(
    command: list[str], env: dict[str, str], log_file: Path
) -> subprocess.Popen:
    """Start the server in its own process group, with output to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as output:
        return subprocess.Popen(
            command,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_until_ready(
    url: str, process: subprocess.Popen, log_file: Path, timeout: float = 120.0
) -> None:
    """Wait until `url` responds; raise RuntimeError if the server exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"MLflow server exited with status {process.returncode}:\n{tail}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    raise RuntimeError(
        f"MLflow server did not respond at {url} within {timeout:.0f} s; see {log_file}"
    )


def stop_server(process: subprocess.Popen, kill: bool = False) -> None:
    """Stop the server and the workers it started (its process group).

    SIGTERM first, SIGKILL after 15 s; with `kill`, SIGKILL at once, as a
    crash would.
    """
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def warn_about_exposure(host: str, basic_auth: bool, backend_store_uri: str) -> None:
    """Log what a non-local bind or a password in the database URI exposes."""
    if host not in LOOPBACK_HOSTS:
        log.warning(
            "Listening on %s: every machine that reaches this port can %s. Set "
            "--allowed-hosts and --cors-allowed-origins through SERVER_ARGS.",
            host,
            "log in with a user name and password"
            if basic_auth
            else "read and change every run (add AUTH=basic)",
        )
    if mask_uri(backend_store_uri) != backend_store_uri:
        log.warning(
            "The backend store URI contains a password, which other local users "
            "can see in the process list; put it in ~/.pgpass or PGPASSWORD instead"
        )


def serve(args: argparse.Namespace) -> None:
    """Replace this process with `mlflow server`, configured from `args`."""
    server_dir = Path(args.server_dir)
    artifacts = local_or_uri(args.artifacts_destination or server_dir / "artifacts")
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    uri = args.backend_store_uri or default_backend_uri()
    env = server_environment(server_dir, args.basic_auth)
    command = server_command(
        uri, artifacts, args.host, args.port, args.workers, args.basic_auth
    )
    command += args.extra
    warn_about_exposure(args.host, args.basic_auth, uri)
    log.info(
        "Starting MLflow server on %s with backend %s and artifacts in %s",
        health_url(args.host, args.port).removesuffix("/health"),
        mask_uri(uri),
        mask_uri(artifacts),
    )
    sys.stdout.flush()
    os.execve(command[0], command, env)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the `create-db` and `serve` command lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("create-db", help="create the role and its database")
    db.add_argument("--role", default=current_user(), help="login role to create")
    db.add_argument("--database", default=DEFAULT_DATABASE, help="database name")
    db.add_argument(
        "--createdb", action="store_true", help="let the role create databases"
    )

    run = commands.add_parser("serve", help="run the tracking server")
    run.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
    run.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port")
    run.add_argument(
        "--backend-store-uri",
        help="database URI (default: this user's role and database 'mlflow' "
        f"over the socket in {SOCKET_DIR})",
    )
    run.add_argument(
        "--artifacts-destination",
        help="folder or URI for artifacts (default: SERVER_DIR/artifacts)",
    )
    run.add_argument(
        "--server-dir",
        default=str(SERVER_DIR),
        help="folder for artifacts and the basic-auth user database",
    )
    run.add_argument("--workers", type=int, default=2, help="worker processes")
    run.add_argument(
        "--basic-auth",
        action="store_true",
        help="require a user name and password (MLflow's basic-auth app)",
    )

    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # Options this parser does not know go to `mlflow server` unchanged.
    args.extra = extra
    return args


def main() -> None:
    """Run the chosen command; configuration errors exit with status 2."""
    from stages.cli import setup_logging

    args = parse_args()
    setup_logging()
    try:
        if args.command == "create-db":
            create_database(args.role, args.database, args.createdb)
        else:
            serve(args)
    except ConfigError as error:
        log.error("%s", error)
        sys.exit(2)


if __name__ == "__main__":
    main()
