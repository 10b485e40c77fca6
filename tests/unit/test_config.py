from pathlib import Path

import pytest

from haifctl.config import SETTINGS, mask_url, resolve
from haifctl.errors import InvalidInput


def write_config(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text)


def test_defaults_come_from_the_home(home: Path) -> None:
    settings = resolve(env={"HAIF_HOME": str(home)})
    assert settings.home == home
    assert settings.registry_url == f"sqlite://{home / 'registry.db'}"
    assert settings.model == "stories260K"
    assert settings.sources["model"] == "default"
    assert settings.sources["home"] == "env HAIF_HOME"
    assert settings.config_file == home / "config.toml"


def test_flag_beats_env_beats_file_beats_default(home: Path) -> None:
    write_config(home, 'model = "from-file"\nn_ctx = 111\nthreads = 3\n')
    env = {"HAIF_HOME": str(home), "HAIF_MODEL": "from-env", "HAIF_N_CTX": "222"}
    settings = resolve({"model": "from-flag", "threads": None}, env=env)
    assert (settings.model, settings.sources["model"]) == ("from-flag", "flag")
    assert (settings.n_ctx, settings.sources["n_ctx"]) == (222, "env HAIF_N_CTX")
    assert (settings.threads, settings.sources["threads"]) == (3, f"file {home / 'config.toml'}")
    assert (settings.max_tokens, settings.sources["max_tokens"]) == (256, "default")


def test_seed_names_are_understood(home: Path) -> None:
    env = {
        "HAIF_HOME": str(home),
        "MODEL_ID": "tiny:2",
        "POSTGRES_USER": "haif",
        "POSTGRES_PASSWORD": "s3cr:t",
        "POSTGRES_DB": "models",
        "POSTGRES_HOST": "db",
    }
    settings = resolve(env=env)
    assert settings.model == "tiny:2"
    assert settings.sources["model"] == "env MODEL_ID"
    assert settings.registry_url == "postgresql://haif:s3cr%3At@db:5432/models"
    assert settings.sources["registry_url"] == "derived from POSTGRES_* settings"
    # HAIF_* wins over the seed's name for the same setting
    assert resolve(env={**env, "HAIF_MODEL": "other"}).model == "other"


def test_secrets_are_masked(home: Path) -> None:
    env = {
        "HAIF_HOME": str(home),
        "HAIF_REGISTRY_URL": "postgresql://u:hunter2@h/db",
        "POSTGRES_PASSWORD": "hunter2",
    }
    settings = resolve(env=env)
    shown = [settings.display_value(s.name) for s in SETTINGS]
    assert not any("hunter2" in value for value in shown)
    assert settings.display_value("registry_url") == "postgresql://u:********@h/db"
    assert mask_url("sqlite:///x.db") == "sqlite:///x.db"


def test_a_redis_password_is_masked_and_the_rest_shown(home: Path) -> None:
    settings = resolve(env={"HAIF_HOME": str(home), "HAIF_REDIS_URL": "redis://:s3cret@r:6379/2"})
    assert settings.redis_url == "redis://:s3cret@r:6379/2"
    assert settings.display_value("redis_url") == "redis://:********@r:6379/2"
    assert resolve(env={"HAIF_HOME": str(home)}).display_value("redis_url") == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("n_ctx = [", "not valid TOML"),
        ("modle = 'x'", "unknown setting 'modle'"),
        ("home = '/x'", "'home' cannot be set"),
        ("n_ctx = 'big'", "expected an integer"),
    ],
)
def test_bad_config_files_are_named(home: Path, text: str, message: str) -> None:
    write_config(home, text)
    with pytest.raises(InvalidInput, match=message) as info:
        resolve(env={"HAIF_HOME": str(home)})
    assert str(home / "config.toml") in info.value.message


def test_bad_env_integer_names_the_variable(home: Path) -> None:
    with pytest.raises(InvalidInput, match="HAIF_THREADS: expected an integer"):
        resolve(env={"HAIF_HOME": str(home), "HAIF_THREADS": "many"})


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:s3cret@h:5432/db", "postgresql://u:********@h:5432/db"),
        ("postgresql://u@h/db?password=s3cret", "postgresql://u@h/db?password=********"),
        (
            "postgres://u@h/db?sslmode=disable&password=s3cret&options=-cx",
            "postgres://u@h/db?sslmode=disable&password=********&options=-cx",
        ),
        (
            "postgresql://u:s3cret@h/db?PASSWORD=s3cret#top",
            "postgresql://u:********@h/db?PASSWORD=********#top",
        ),
        ("postgresql://:s3cret@h/db", "postgresql://:********@h/db"),
        ("postgresql://h/db?sslpassword=s3cret", "postgresql://h/db?sslpassword=********"),
        ("host=h password=s3cret dbname=db", "host=h password=******** dbname=db"),
        ("postgresql://u@h/db?passwords_seen=2", "postgresql://u@h/db?passwords_seen=2"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
        ("postgresql://[not a url", "postgresql://[not a url"),
    ],
)
def test_mask_url_masks_both_password_forms(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_mask_url_masks_a_urls_password_in_a_message_about_it() -> None:
    url = "postgresql://u:p%40ss-word@h/db?password=other-one"
    message = 'invalid percent-encoded token: "p%40ss-word"; p@ss-word; other-one refused'
    masked = mask_url(message, url)
    assert "ss-word" not in masked
    assert "other-one" not in masked
    assert masked.startswith("invalid percent-encoded token: ")


def test_config_show_masks_a_query_password(home: Path) -> None:
    url = "postgresql://u@h/db?password=hunter2&sslmode=disable"
    settings = resolve(env={"HAIF_HOME": str(home), "HAIF_REGISTRY_URL": url})
    assert settings.display_value("registry_url") == (
        "postgresql://u@h/db?password=********&sslmode=disable"
    )
