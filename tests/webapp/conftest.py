from tests.webapp.team import team  # noqa: F401  (the fixture, for every page test here)
