"""The dashboard's pages, one module each: ``PATH``, ``NAME``, component ids as constants,
``layout()`` (static: the data arrives through callbacks, so one layout serves any store) and
``register(app, ctx)`` (the page's callbacks, bound to one app and its store)."""

from mechscope.app.pages import circuits, explore, heads, runs, tracing

PAGES = (runs, tracing, heads, circuits, explore)

__all__ = ["PAGES", "circuits", "explore", "heads", "runs", "tracing"]
