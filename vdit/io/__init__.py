"""Reading and writing videos and images."""
from vdit.io.video import contact_sheet, save_video, to_uint8_frames

__all__ = ["contact_sheet", "save_video", "to_uint8_frames"]
