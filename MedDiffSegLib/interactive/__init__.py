"""Interactive correction: clicks, a box and the previous mask as prompts for a method."""

from .prompts import PROMPT_CHANNELS, Click, box_map, click_map, error_click, previous_map, prompt_maps

__all__ = ["PROMPT_CHANNELS", "Click", "box_map", "click_map", "error_click", "previous_map", "prompt_maps"]
