"""Place mode that stays on until the user leaves it, without changing Slicer's setting for good (MRML only,
no Qt).

Slicer's place mode places one point and stops unless the interaction node's PlaceModePersistence is on, and
that setting is the application's, shared by every module. ``PersistentPlacing`` turns it on for a placement
and gives the previous value back when place mode ends (every point of a fixed-size list placed, Esc, a
right-click, another mouse mode), or when ``stop`` is called (the session ends, the module is left).
"""

from __future__ import annotations


class PersistentPlacing:
    def __init__(self, interaction_node):
        self.interaction = interaction_node
        self._previous = None  # the persistence before placing began, while placing
        self._tag = None

    @property
    def placing(self) -> bool:
        return self._previous is not None

    def start(self) -> None:
        """Place mode, persistent (the list or curve to place into is the markups logic's active one)."""
        node = self.interaction
        if not self.placing:
            self._previous = node.GetPlaceModePersistence()
            self._tag = node.AddObserver(node.EndPlacementEvent, self._ended)  # invoked on leaving place mode
        node.SetPlaceModePersistence(1)
        node.SetCurrentInteractionMode(node.Place)

    def _ended(self, caller=None, event=None) -> None:
        self.stop()

    def stop(self) -> None:
        """Give the persistence back as it was before placing began (place mode itself is left as it is)."""
        if not self.placing:
            return
        self.interaction.RemoveObserver(self._tag)
        self.interaction.SetPlaceModePersistence(self._previous)
        self._previous = self._tag = None
