"""Small helpers shared by the dashboards: figure -> Image widget, readable error messages."""
from __future__ import annotations

import functools
import html
from typing import Callable

import ipywidgets as widgets
from matplotlib.figure import Figure

from ..errors import CorrlabError
from ..plotting import figure_to_png

__all__ = ["figure_image", "set_figure", "show_message", "guarded", "USER_ERRORS"]

#: Errors a dashboard turns into a message (an invalid selection), instead of a traceback.
USER_ERRORS = (CorrlabError, KeyError, IndexError, ValueError)


def figure_image(description: str = "") -> widgets.Image:
    """An empty PNG ``Image`` widget whose ``description`` (kept in ``layout`` too) names the figure."""
    # align_self: a flex container (VBox / HBox) would otherwise stretch the image to its own width
    img = widgets.Image(format="png", layout=widgets.Layout(max_width="100%", height="auto", align_self="flex-start"))
    img.add_class("corrlab-figure")
    if description:
        img.add_class(f"corrlab-{description}")
    return img


def set_figure(image: widgets.Image, fig: Figure, dpi: int = 90) -> None:
    """Show ``fig`` in ``image`` (PNG bytes)."""
    image.value = figure_to_png(fig, dpi=dpi)


def show_message(label: widgets.HTML, text: str = "", kind: str = "error") -> None:
    """Write a one-line message (HTML-escaped) into ``label``; empty text clears it."""
    colour = {"error": "#b2182b", "info": "#2166ac", "ok": "#1a7837"}.get(kind, "black")
    label.value = f'<span style="color:{colour}">{html.escape(text)}</span>' if text else ""


def guarded(method: Callable) -> Callable:
    """Decorate a dashboard handler: user errors become a message in ``self.message``, not a traceback.

    The method's return value is passed through; on an error it returns None and keeps the error in
    ``self.last_error`` (None after a successful call), so tests and callers can check it.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            result = method(self, *args, **kwargs)
        except USER_ERRORS as e:
            text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            show_message(self.message, f"{type(e).__name__}: {text}", "error")
            self.last_error = e
            return None
        self.last_error = None
        return result

    return wrapper
