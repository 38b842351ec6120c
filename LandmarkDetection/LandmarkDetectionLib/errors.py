"""The one exception type for problems a user can cause (bad files, bad options).

The command line prints such an error as a single line naming the file and the problem and exits
non-zero; everything else is a bug and keeps its traceback.
"""


class LandmarkError(Exception):
    """A user-caused problem. ``str(error)`` is one line: ``<file>: <problem>``."""

    def __init__(self, path, problem):
        self.path = str(path) if path is not None else None
        self.problem = " ".join(str(problem).split())  # always one line
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)
