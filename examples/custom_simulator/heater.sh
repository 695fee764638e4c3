#!/bin/sh
# heater.sh -- start heater.awk so that it answers each query as soon as the query has arrived.
#
# mawk (the default awk on Debian/Ubuntu) reads a pipe in whole blocks and would wait for more input
# than one query; -W interactive makes it read line by line. gawk, BSD awk and busybox awk already do.
# `exec` replaces this shell, so bbzo's pid, signals and pipes go straight to awk.
here=$(dirname "$0")
if awk -W version 2>/dev/null | grep -qi mawk; then
    exec awk -W interactive -f "$here/heater.awk" "$@"
fi
exec awk -f "$here/heater.awk" "$@"
