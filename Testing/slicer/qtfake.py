"""Just enough of PythonQt's ``qt`` API for the MedDiffSeg Widget's ``setup()`` and its handlers to run.

The slicer-core wheel has no Qt. These classes behave like the PythonQt objects the Widget uses,
the way it uses them: properties set by assignment (``button.enabled = False``), signals connected
by their C++ signature (``combo.connect("currentIndexChanged(int)", slot)``) and emitted the way Qt
emits them (a changed current index, a check-state change of a list item; not while
``blockSignals(True)``; ``activated``/``clicked`` only by the simulated user: :meth:`QComboBox.activate`,
:meth:`QAbstractButton.click`), slots called with as many of the signal's arguments as they take.
:func:`load_ui` builds the widget tree of a ``.ui`` file (class, name, the properties it sets), as
``slicer.util.loadUI`` does; :func:`child_widget_variables` is ``slicer.util.childWidgetVariables``.
``QTimer.singleShot`` callbacks and timers run when the test calls :func:`process_events` /
:meth:`QTimer.fire`. Anything not modelled here raises AttributeError, so a Widget change that needs
more of Qt shows up as a test failure, not as a silent no-op.
"""

from __future__ import annotations

import inspect
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable


def _arity(slot: Callable) -> int | None:
    """How many positional arguments ``slot`` takes (None: any number)."""
    try:
        params = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return None
    count = 0
    for p in params:
        if p.kind == p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


class QObject:
    def __init__(self, *args, **kwargs):
        self._slots: dict[str, list[Callable]] = {}
        self._blocked = False
        self.objectName = ""

    def connect(self, signature: str, slot: Callable) -> bool:
        name = signature.split("(", 1)[0]
        self._slots.setdefault(name, []).append(slot)
        return True

    def disconnect(self, signature: str, slot: Callable | None = None) -> bool:
        name = signature.split("(", 1)[0]
        if slot is None:
            self._slots.pop(name, None)
        elif slot in self._slots.get(name, []):
            self._slots[name].remove(slot)
        return True

    def blockSignals(self, block: bool) -> bool:
        was, self._blocked = self._blocked, bool(block)
        return was

    def signalsBlocked(self) -> bool:
        return self._blocked

    def emit(self, name: str, *args) -> None:
        if self._blocked:
            return
        for slot in list(self._slots.get(name, [])):
            n = _arity(slot)
            slot(*(args if n is None else args[:n]))


class QWidget(QObject):
    def __init__(self, *args, **kwargs):
        super().__init__()
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self.children_: list[QWidget] = []
        self.parentWidget_: QWidget | None = None

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def setVisible(self, visible: bool) -> None:
        self.visible = bool(visible)

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def isVisible(self) -> bool:
        return self.visible

    def setToolTip(self, text: str) -> None:
        self.toolTip = text

    def findChildren(self):
        out = []
        for child in self.children_:
            out.append(child)
            out.extend(child.findChildren())
        return out

    # qMRMLWidget and the MRML combo boxes: the .ui's mrmlSceneChanged connections pass the scene on
    def setMRMLScene(self, scene) -> None:
        self.mrmlScene = scene
        for child in self.findChildren():
            if hasattr(child, "_mrmlAware"):
                child.mrmlScene = scene


class QLabel(QWidget):
    def __init__(self, text: str = "", *args):
        super().__init__()
        self.text = text
        self.wordWrap = False


class QAbstractButton(QWidget):
    def __init__(self, text: str = "", *args):
        super().__init__()
        self.text = text
        self.checkable = False
        self._checked = False

    @property
    def checked(self) -> bool:
        return self._checked

    @checked.setter
    def checked(self, value: bool) -> None:
        value = bool(value)
        if value != self._checked:
            self._checked = value
            self.emit("toggled", value)

    def setChecked(self, value: bool) -> None:
        self.checked = value

    def isChecked(self) -> bool:
        return self._checked

    def click(self) -> None:
        """The user clicks (nothing happens on a disabled button, as in Qt)."""
        if not self.enabled:
            return
        if self.checkable:
            self.checked = not self._checked
        self.emit("clicked", self._checked)


class QPushButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    def __init__(self, text: str = "", *args):
        super().__init__(text)
        self.checkable = True


class ctkCollapsibleButton(QAbstractButton):  # noqa: N801 - the CTK class name
    def __init__(self, text: str = "", *args):
        super().__init__(text)
        self.collapsed = False


class QProgressBar(QWidget):
    def __init__(self, *args):
        super().__init__()
        self.minimum, self.maximum, self.value = 0, 100, 0
        self.format = "%p%"
        self.textVisible = True


class _ValueWidget(QWidget):
    signal = "valueChanged"

    def __init__(self, *args):
        super().__init__()
        self.minimum, self.maximum, self.singleStep, self.decimals = 0.0, 99.0, 1.0, 2
        self._value = 0.0

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v) -> None:
        v = min(max(v, self.minimum), self.maximum)
        if v != self._value:
            self._value = v
            self.emit(self.signal, v)


class QSpinBox(_ValueWidget):
    pass


class QDoubleSpinBox(_ValueWidget):
    pass


class ctkSliderWidget(_ValueWidget):  # noqa: N801
    pass


class QLineEdit(QWidget):
    def __init__(self, text: str = "", *args):
        super().__init__()
        self._text = text
        self.placeholderText = ""

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        if value != self._text:
            self._text = value
            self.emit("textChanged", value)


class QComboBox(QWidget):
    def __init__(self, *args):
        super().__init__()
        self._items: list[dict[str, Any]] = []
        self._current = -1

    @property
    def count(self) -> int:
        return len(self._items)

    def addItem(self, text: str, data: Any = None) -> None:
        self._items.append({"text": text, "data": data, "separator": False})
        if self._current < 0:
            self._setCurrent(0)

    def addItems(self, texts) -> None:
        for t in texts:
            self.addItem(t)

    def insertSeparator(self, index: int) -> None:
        self._items.insert(index, {"text": "", "data": None, "separator": True})
        if self._current >= index:
            self._current += 1

    def clear(self) -> None:
        self._items = []
        self._setCurrent(-1)

    def itemText(self, index: int) -> str:
        return self._items[index]["text"] if 0 <= index < len(self._items) else ""

    def itemData(self, index: int) -> Any:
        return self._items[index]["data"] if 0 <= index < len(self._items) else None

    def findData(self, data: Any) -> int:
        for i, item in enumerate(self._items):
            if not item["separator"] and item["data"] == data:
                return i
        return -1

    def findText(self, text: str) -> int:
        for i, item in enumerate(self._items):
            if not item["separator"] and item["text"] == text:
                return i
        return -1

    def _setCurrent(self, index: int) -> None:
        index = index if -1 <= index < len(self._items) else -1
        if index != self._current:
            self._current = index
            self.emit("currentIndexChanged", index)
            self.emit("currentTextChanged", self.currentText)

    @property
    def currentIndex(self) -> int:
        return self._current

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        self._setCurrent(int(index))

    def setCurrentIndex(self, index: int) -> None:
        self._setCurrent(int(index))

    @property
    def currentData(self) -> Any:
        return self.itemData(self._current)

    @property
    def currentText(self) -> str:
        return self.itemText(self._current)

    @currentText.setter
    def currentText(self, text: str) -> None:
        self._setCurrent(self.findText(text))

    def items(self) -> list[tuple[str, Any]]:
        """(text, data) of every item that is not a separator (for tests)."""
        return [(i["text"], i["data"]) for i in self._items if not i["separator"]]

    def activate(self, index: int) -> None:
        """The user picks item ``index``: currentIndexChanged (when it changes), then activated."""
        self._setCurrent(index)
        self.emit("activated", index)


class QListWidgetItem:
    def __init__(self, text: str = ""):
        self._data: dict[int, Any] = {Qt.DisplayRole: text}
        self._flags = Qt.ItemIsSelectable | Qt.ItemIsEnabled
        self._check = None
        self._list: QListWidget | None = None

    def text(self) -> str:
        return self._data.get(Qt.DisplayRole, "")

    def setText(self, text: str) -> None:
        self.setData(Qt.DisplayRole, text)

    def data(self, role: int) -> Any:
        return self._data.get(role)

    def setData(self, role: int, value: Any) -> None:
        self._data[role] = value
        self._changed()

    def flags(self) -> int:
        return self._flags

    def setFlags(self, flags: int) -> None:
        self._flags = flags

    def checkState(self) -> int:
        return Qt.Unchecked if self._check is None else self._check

    def setCheckState(self, state: int) -> None:
        if state != self._check:
            self._check = state
            self._changed()

    def _changed(self) -> None:
        if self._list is not None:
            self._list.emit("itemChanged", self)


class QListWidget(QWidget):
    def __init__(self, *args):
        super().__init__()
        self._items: list[QListWidgetItem] = []

    @property
    def count(self) -> int:
        return len(self._items)

    def addItem(self, item) -> None:
        item = item if isinstance(item, QListWidgetItem) else QListWidgetItem(str(item))
        item._list = self
        self._items.append(item)

    def item(self, row: int) -> QListWidgetItem | None:
        return self._items[row] if 0 <= row < len(self._items) else None

    def clear(self) -> None:
        for item in self._items:
            item._list = None
        self._items = []


class QTableWidgetItem:
    def __init__(self, text: str = ""):
        self._text = text
        self._data: dict[int, Any] = {}
        self.toolTip = ""

    def text(self) -> str:
        return self._text

    def setText(self, text: str) -> None:
        self._text = text

    def data(self, role: int) -> Any:
        return self._data.get(role)

    def setData(self, role: int, value: Any) -> None:
        self._data[role] = value

    def setToolTip(self, text: str) -> None:
        self.toolTip = text


class QHeaderView(QWidget):
    Stretch, ResizeToContents, Interactive = 1, 3, 0

    def setSectionResizeMode(self, *args) -> None:
        pass

    def setStretchLastSection(self, value: bool) -> None:
        pass


class QTableWidget(QWidget):
    def __init__(self, *args):
        super().__init__()
        self._columns = 0
        self._rows = 0
        self._cells: dict[tuple[int, int], QTableWidgetItem] = {}
        self._labels: list[str] = []
        self._header = QHeaderView()
        self._current = -1

    def setColumnCount(self, n: int) -> None:
        self._columns = n

    def columnCount(self) -> int:
        return self._columns

    def setRowCount(self, n: int) -> None:
        self._rows = n
        self._cells = {k: v for k, v in self._cells.items() if k[0] < n}

    def rowCount(self) -> int:
        return self._rows

    def setHorizontalHeaderLabels(self, labels) -> None:
        self._labels = list(labels)

    def horizontalHeaderLabels(self) -> list[str]:
        return list(self._labels)

    def horizontalHeader(self) -> QHeaderView:
        return self._header

    def setItem(self, row: int, column: int, item: QTableWidgetItem) -> None:
        self._cells[(row, column)] = item

    def item(self, row: int, column: int) -> QTableWidgetItem | None:
        return self._cells.get((row, column))

    def currentRow(self) -> int:
        return self._current

    def selectRow(self, row: int) -> None:
        self._current = row

    def rows(self) -> list[list[str]]:
        """The table's text, row by row (for tests)."""
        return [[(self._cells.get((r, c)).text() if self._cells.get((r, c)) else "") for c in range(self._columns)]
                for r in range(self._rows)]

    def doubleClick(self, row: int, column: int = 0) -> None:
        self._current = row
        self.emit("cellDoubleClicked", row, column)


class qMRMLNodeComboBox(QWidget):  # noqa: N801
    _mrmlAware = True

    def __init__(self, *args):
        super().__init__()
        self.mrmlScene = None
        self._node = None
        self.noneEnabled = False

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node) -> None:
        if node is not self._node:
            self._node = node
            self.emit("currentNodeChanged", node)


class qMRMLWidget(QWidget):  # noqa: N801
    pass


class QLayout(QObject):
    def __init__(self, *args):
        super().__init__()
        self.widgets: list = []

    def addWidget(self, widget, *args) -> None:
        self.widgets.append(widget)

    def addStretch(self, *args) -> None:
        pass


class QVBoxLayout(QLayout):
    pass


class QFormLayout(QLayout):
    pass


class QHBoxLayout(QLayout):
    pass


class QColor:
    def __init__(self, *rgb):
        self.rgb = tuple(rgb)

    def name(self) -> str:
        return "#%02x%02x%02x" % tuple(int(c) for c in self.rgb[:3])


class Qt:
    DisplayRole, DecorationRole, ToolTipRole, UserRole = 0, 1, 3, 256
    Unchecked, PartiallyChecked, Checked = 0, 1, 2
    ItemIsSelectable, ItemIsEditable, ItemIsUserCheckable, ItemIsEnabled = 1, 2, 16, 32
    WaitCursor, BusyCursor, ArrowCursor = 3, 16, 0
    AlignLeft, AlignRight, AlignCenter = 1, 2, 132


class QApplication:
    cursors: list = []

    @staticmethod
    def setOverrideCursor(cursor) -> None:
        QApplication.cursors.append(cursor)

    @staticmethod
    def restoreOverrideCursor() -> None:
        if QApplication.cursors:
            QApplication.cursors.pop()

    @staticmethod
    def processEvents(*args) -> None:
        process_events()


#: Callbacks queued by QTimer.singleShot, run by process_events().
_pending: list[Callable] = []
#: Every QTimer made (tests fire the active ones).
timers: list["QTimer"] = []


class QTimer(QObject):
    def __init__(self, *args):
        super().__init__()
        self.interval = 0
        self.singleShot_ = False
        self._active = False
        timers.append(self)

    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def setSingleShot(self, value: bool) -> None:
        self.singleShot_ = bool(value)

    def start(self, ms: int | None = None) -> None:
        if ms is not None:
            self.interval = ms
        self._active = True

    def stop(self) -> None:
        self._active = False

    def isActive(self) -> bool:
        return self._active

    def fire(self) -> None:
        """Time out once (when active), as the event loop would."""
        if self._active:
            if self.singleShot_:
                self._active = False
            self.emit("timeout")

    @staticmethod
    def singleShot(ms: int, callback: Callable) -> None:
        _pending.append(callback)


def process_events() -> None:
    while _pending:
        _pending.pop(0)()


class QKeySequence:
    def __init__(self, text: str = ""):
        self.text = str(text)

    def toString(self) -> str:
        return self.text


#: Every QShortcut made that was not deleted (tests press them with :meth:`QShortcut.activate`).
shortcuts: list["QShortcut"] = []


class QShortcut(QObject):
    """A keyboard shortcut: ``activated`` is emitted when the user presses its keys (:meth:`activate`) while it is
    enabled."""

    def __init__(self, key=None, parent=None, *args):
        super().__init__()
        self._key = key if isinstance(key, QKeySequence) else QKeySequence(key or "")
        self.enabled = True
        self.parent_ = parent
        shortcuts.append(self)

    def key(self) -> QKeySequence:
        return self._key

    def setKey(self, key) -> None:
        self._key = key if isinstance(key, QKeySequence) else QKeySequence(key)

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def activate(self) -> None:
        """The user presses the keys."""
        if self.enabled:
            self.emit("activated")

    def setParent(self, parent) -> None:
        self.parent_ = parent
        if parent is None and self in shortcuts:
            shortcuts.remove(self)

    def deleteLater(self) -> None:
        self.setParent(None)


def press(keys: str) -> int:
    """Press ``keys`` (e.g. ``"Ctrl+Z"``): every enabled shortcut for them is activated; returns how many."""
    hit = [sc for sc in list(shortcuts) if sc.key().toString() == keys and sc.enabled]
    for sc in hit:
        sc.activate()
    return len(hit)


class QFileDialog:
    """Tests replace these with the answer the user would give."""

    @staticmethod
    def getOpenFileName(*args) -> str:
        raise AssertionError("the test did not say which file the user picks")

    @staticmethod
    def getExistingDirectory(*args) -> str:
        raise AssertionError("the test did not say which folder the user picks")


class QInputDialog:
    @staticmethod
    def getText(*args, **kwargs) -> str:
        raise AssertionError("the test did not say what the user types")


class QMessageBox:
    Ok, Cancel, Yes, No = 1024, 4194304, 16384, 65536


WIDGET_CLASSES: dict[str, type] = {cls.__name__: cls for cls in (
    QWidget, QLabel, QPushButton, QCheckBox, ctkCollapsibleButton, QProgressBar, QSpinBox, QDoubleSpinBox,
    ctkSliderWidget, QLineEdit, QComboBox, QListWidget, QTableWidget, qMRMLNodeComboBox, qMRMLWidget)}
LAYOUT_CLASSES = {"QVBoxLayout", "QHBoxLayout", "QFormLayout", "QGridLayout"}


def _property_value(prop: ET.Element):
    child = list(prop)[0]
    tag, text = child.tag, child.text or ""
    if tag == "bool":
        return text == "true"
    if tag == "number":
        return int(text)
    if tag == "double":
        return float(text)
    if tag in ("string", "cstring", "enum", "set"):
        return text
    return None


def load_ui(path: str | Path) -> QWidget:
    """The widget tree of a Qt Designer file: one object per ``<widget>``, of its class, with its name and
    the properties the file sets (text, enabled, visible, checked, value, minimum, maximum, collapsed...)."""
    root_el = ET.parse(str(path)).getroot().find("widget")

    def build(el: ET.Element, parent: QWidget | None) -> QWidget:
        cls = WIDGET_CLASSES.get(el.get("class"))
        if cls is None:
            raise AssertionError(f"qtfake has no stand-in for widget class {el.get('class')!r} ({el.get('name')})")
        widget = cls()
        widget.objectName = el.get("name") or ""
        order = {"minimum": 0, "maximum": 1}  # before "value", which they clamp
        for prop in sorted(el.findall("property"), key=lambda p: order.get(p.get("name"), 2)):
            value = _property_value(prop)
            name = prop.get("name")
            if value is None or name in ("geometry", "sizePolicy"):
                continue
            if name == "currentIndex":
                continue
            setattr(widget, name, value)
        if parent is not None:
            parent.children_.append(widget)
            widget.parentWidget_ = parent
        for child in _child_widgets(el):
            build(child, widget)
        return widget

    return build(root_el, None)


def _child_widgets(el: ET.Element):
    for child in el:
        if child.tag == "widget":
            yield child
        elif child.tag in ("layout", "item"):
            yield from _child_widgets(child)


def child_widget_variables(widget: QWidget) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{w.objectName: w for w in widget.findChildren() if w.objectName})


def make_module(name: str = "qt") -> types.ModuleType:
    """A ``qt`` (or ``ctk``) module of these classes; other names fall back to permissive stand-ins."""
    module = types.ModuleType(name)
    module.__doc__ = __doc__
    for key, value in dict(globals()).items():
        if isinstance(value, type) and not key.startswith("_"):
            setattr(module, key, value)
    module.process_events = process_events
    module.press = press

    def __getattr__(attr: str):  # names the Widget does not use: inert stand-ins, as before
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (_Inert,), {})

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
    return module


class _Inert:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()

    def connect(self, *args, **kwargs):
        return True
