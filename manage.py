#!/usr/bin/env python
import os
import sys

from django.core.management import execute_from_command_line

from tokenmgr_project.core.envfile import envfile_apply, envfile_path


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tokenmgr_project.settings")
    if sys.argv[1:2] != ["up"]:
        # Commands use the settings the running system was started with; `up` takes its own
        # from its environment only, so a file left by an earlier run never picks its database.
        try:
            applied = envfile_apply(os.environ)
        except OSError as exc:  # silently falling back to other settings is what it prevents
            sys.exit(f"manage.py: cannot read {envfile_path(os.environ)} ({exc.strerror})")
        if applied:
            sys.stderr.write(
                f"manage.py: {', '.join(applied)} from {envfile_path(os.environ)} (saved by "
                "`manage.py up`; set a variable to use another value)\n"
            )
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
