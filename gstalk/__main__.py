from gstalk.cli import entry

entry()
