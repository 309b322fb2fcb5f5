"""AUTOMATIC1111's `modules.ui_components`: the layout blocks and controls scripts build their `ui()` with
(`FormRow`, `FormColumn`, `FormGroup`, `FormHTML`, `ToolButton`, `ResizeHandleRow`, `DropdownMulti`,
`DropdownEditable`, `InputAccordion`), as Gradio components. Easel reads the controls `ui()` returns and renders
its own from them (`backend/a1111_scripts.py`): an `InputAccordion` is its checkbox (open = True), the layout
blocks only group what is made inside them. Gradio is imported when a script first uses one of these names."""
from __future__ import annotations

from functools import lru_cache

from modules.context import missing

__all__ = ["FormRow", "FormColumn", "FormGroup", "FormHTML", "ToolButton", "ResizeHandleRow", "DropdownMulti",
           "DropdownEditable", "InputAccordion"]


@lru_cache(maxsize=None)
def _components() -> dict:
    import gradio as gr

    class FormRow(gr.Row):
        pass

    class FormColumn(gr.Column):
        pass

    class FormGroup(gr.Group):
        pass

    class FormHTML(gr.HTML):
        pass

    class ResizeHandleRow(gr.Row):
        def __init__(self, **kwargs):
            classes = kwargs.pop("elem_classes", None) or []
            super().__init__(elem_classes=[*([classes] if isinstance(classes, str) else classes),
                                           "resize-handle-row"], **kwargs)

    class ToolButton(gr.Button):
        """A small button with one symbol, as A1111's."""

        def __init__(self, *args, **kwargs):
            classes = kwargs.pop("elem_classes", None) or []
            super().__init__(*args, elem_classes=["tool", *([classes] if isinstance(classes, str) else classes)],
                             **kwargs)

    class DropdownMulti(gr.Dropdown):
        def __init__(self, **kwargs):
            super().__init__(multiselect=True, **kwargs)

    class DropdownEditable(gr.Dropdown):
        def __init__(self, **kwargs):
            super().__init__(allow_custom_value=True, **kwargs)

    class InputAccordion(gr.Checkbox):
        """An accordion whose value is whether it is open (A1111's): a checkbox, with an accordion the controls
        made inside `with InputAccordion(...)` go into."""

        def __init__(self, value, **kwargs):
            self.accordion_id = kwargs.get("elem_id") or "input-accordion"
            super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
            self.accordion = gr.Accordion(label=kwargs.get("label", "Accordion"), open=bool(value),
                                          elem_id=self.accordion_id, elem_classes=["input-accordion"])

        def extra(self):
            return gr.Column(elem_id=f"{self.accordion_id}-extra", elem_classes="input-accordion-extra", min_width=0)

        def __enter__(self):
            self.accordion.__enter__()
            return self

        def __exit__(self, exc_type, exc_val, exc_tb):
            self.accordion.__exit__(exc_type, exc_val, exc_tb)

    return {cls.__name__: cls for cls in (FormRow, FormColumn, FormGroup, FormHTML, ResizeHandleRow, ToolButton,
                                          DropdownMulti, DropdownEditable, InputAccordion)}


def __getattr__(name: str):
    if name in __all__:
        return _components()[name]
    raise missing(__name__, name)
