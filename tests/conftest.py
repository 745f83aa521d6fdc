import pytest


def pytest_collection_modifyitems(config, items):
    """Multi-process tests also count as slow-ish; nothing else to do here but keep markers honest."""
    for item in items:
        if 'dist' in item.keywords and item.get_closest_marker('timeout') is None:
            item.add_marker(pytest.mark.dist)
