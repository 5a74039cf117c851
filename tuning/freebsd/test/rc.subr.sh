#!/bin/sh
# tuning/freebsd/test/rc.subr.sh -- a small stand-in for FreeBSD's /etc/rc.subr,
# so that rc.d/tern can run its start, stop and status paths on any OS.
#
# Written from the behaviour rc.subr(8) documents, not from rc.subr itself:
#   - load_rc_config NAME: read the rc.conf settings (here: $STANDIN_RC_CONF).
#   - checkyesno VAR: YES/TRUE/ON/1 is true, NO/FALSE/OFF/0 false, anything
#     else warns and is false.
#   - err CODE MSG / warn MSG: "$0: ERROR: MSG" (then exit) / "$0: WARNING: MSG"
#     on stderr.
#   - run_rc_command ARG with the prefixes one, force, fast and quiet, and the
#     methods start, stop, status and restart:
#       ${name}_program replaces `command`; ${name}_flags (or $flags from the
#       environment) become rc_flags, placed between the command and
#       command_args; ${name}_user runs the command through `su -m USER -c`;
#       ${name}_chdir is entered first; ${name}_login_class (default
#       "daemon") and ${name}_limits become `limits -C CLASS LIMITS` in front
#       of it all; ${name}_env and ${name}_nice, ${name}_prepend are applied.
#       start: refuses when rcvar is not YES (unless one/force), when the
#       process already runs (unless fast), when `command` is not executable
#       or a required_files entry is not readable; then runs start_precmd and
#       the command. status/stop find the pid with check_pidfile (pidfile +
#       procname, which defaults to `command`); stop sends sig_stop (default
#       TERM) and waits for the process to go.
#   Reserved names this stand-in does not model (${name}_chroot, _group,
#   _groups, _fib, _cpuset, _oomprotect, _umask, _setup, _env_file) make it
#   fail loudly, so a script using them cannot pass the test unnoticed.
#
# Test knobs (environment):
#   STANDIN_ROOT     directory that stands for / (files, pidfile, commands)
#   STANDIN_RC_CONF  the rc.conf settings to load
#   STANDIN_LOG      every command line that would run is appended here
# The process table is $STANDIN_ROOT/proctable, one "PID COMMAND ARGS..." per
# line; the daemon stub adds to it, kill (a function here) removes from it.
# Nothing ever signals a real process.
#
# The sourcing rc.d script sets name, command, command_args and friends, and
# the ${name}_* values are read with eval, which shellcheck cannot follow:
# shellcheck disable=SC2154

: "${STANDIN_ROOT:?STANDIN_ROOT must be set}"
: "${STANDIN_LOG:?STANDIN_LOG must be set}"

load_rc_config()
{
	# shellcheck source=/dev/null
	[ -z "${STANDIN_RC_CONF:-}" ] || [ ! -r "$STANDIN_RC_CONF" ] || . "$STANDIN_RC_CONF"
}

checkyesno()
{
	eval "_v=\${$1:-}"
	case $_v in
	[Yy][Ee][Ss] | [Tt][Rr][Uu][Ee] | [Oo][Nn] | 1) return 0 ;;
	[Nn][Oo] | [Ff][Aa][Ll][Ss][Ee] | [Oo][Ff][Ff] | 0) return 1 ;;
	*)
		warn "\$$1 is not set properly - see rc.conf(5)."
		return 1
		;;
	esac
}

err()
{
	_code=$1
	shift
	echo "$0: ERROR: $*" >&2
	exit "$_code"
}

warn()
{
	echo "$0: WARNING: $*" >&2
}

# The pid in PIDFILE when that process runs PROCNAME (its first word).
check_pidfile()
{
	[ -r "$STANDIN_ROOT$1" ] || return 0
	read -r _pid _rest < "$STANDIN_ROOT$1" || true
	[ -n "${_pid:-}" ] || return 0
	awk -v pid="$_pid" -v proc="$2" '$1 == pid && $2 == proc { print pid }' \
		"$STANDIN_ROOT/proctable" 2>/dev/null
}

# Replaces the shell's kill: records the signal and ends fake processes only.
kill()
{
	echo "kill $*" >> "$STANDIN_LOG"
	_sig=${1#-}
	shift
	for _p in "$@"; do
		case $_sig in
		TERM | INT | KILL | 15 | 2 | 9)
			awk -v pid="$_p" '$1 != pid' "$STANDIN_ROOT/proctable" > "$STANDIN_ROOT/proctable.new"
			mv "$STANDIN_ROOT/proctable.new" "$STANDIN_ROOT/proctable"
			;;
		esac
	done
}

wait_for_pids()
{
	_tries=0
	for _p in "$@"; do
		while awk -v pid="$_p" '$1 == pid { found = 1 } END { exit !found }' "$STANDIN_ROOT/proctable"; do
			_tries=$((_tries + 1))
			[ "$_tries" -le 50 ] || { echo "wait_for_pids: $_p did not exit" >&2; return 1; }
			sleep 0.1
		done
	done
}

# Runs a command line as rc.subr would (eval), after logging it.
_standin_doit()
{
	echo "run: $1" >> "$STANDIN_LOG"
	eval "$1"
}

run_rc_command()
{
	_arg=$1
	rc_fast='' rc_force='' rc_quiet='' _one=''
	case $_arg in
	fast*) _arg=${_arg#fast}; rc_fast=yes; rc_quiet=yes ;;
	force*) _arg=${_arg#force}; rc_force=yes ;;
	one*) _arg=${_arg#one}; _one=yes ;;
	quiet*) _arg=${_arg#quiet}; rc_quiet=yes ;;
	esac

	[ -n "${name:-}" ] || err 3 "run_rc_command: \$name is not set."
	for _x in chroot group groups fib cpuset oomprotect umask setup env_file; do
		eval "_val=\${${name}_${_x}:-}"
		[ -z "$_val" ] || err 3 "stand-in: ${name}_${_x} is not modelled"
	done

	eval "_program=\${${name}_program:-}"
	command=${_program:-${command:-}}
	_procname=${procname:-$command}
	if [ -n "${flags:-}" ]; then
		rc_flags=$flags
	else
		eval "rc_flags=\${${name}_flags:-}"
	fi
	eval "_chdir=\${${name}_chdir:-} _user=\${${name}_user:-} _nice=\${${name}_nice:-}"
	eval "_env=\${${name}_env:-} _prepend=\${${name}_prepend:-} _limits=\${${name}_limits:-}"
	eval "_login_class=\${${name}_login_class:-daemon}"

	rc_pid=
	if [ -n "${pidfile:-}" ]; then
		rc_pid=$(check_pidfile "$pidfile" "$_procname")
	fi

	case $_arg in
	start | stop | restart)
		if [ -n "${rcvar:-}" ] && [ -z "$_one$rc_force" ] && ! checkyesno "$rcvar"; then
			# stop of a running service that was disabled still works.
			if [ "$_arg" != stop ] || [ -z "$rc_pid" ]; then
				[ -n "$rc_quiet" ] && return 0
				echo "Cannot '$_arg' $name. Set $rcvar to YES in /etc/rc.conf or use 'one$_arg' instead of '$_arg'."
				return 0
			fi
		fi
		;;
	esac

	case $_arg in
	status)
		if [ -n "$rc_pid" ]; then
			echo "$name is running as pid $rc_pid."
			return 0
		fi
		echo "$name is not running."
		return 1
		;;
	start)
		if [ -z "$rc_fast" ] && [ -n "$rc_pid" ]; then
			echo "$name already running? (pid=$rc_pid)." >&2
			return 1
		fi
		if [ ! -x "$STANDIN_ROOT$command" ]; then
			warn "run_rc_command: cannot run $command"
			return 1
		fi
		for _f in ${required_files:-}; do
			if [ ! -r "$STANDIN_ROOT$_f" ]; then
				warn "$_f is not readable."
				[ -n "$rc_force" ] || return 1
			fi
		done
		if [ -n "${start_precmd:-}" ]; then
			if ! eval "$start_precmd"; then
				warn "failed precmd routine for $name"
				[ -n "$rc_force" ] || return 1
			fi
		fi
		echo "Starting $name."
		_doit="${_env:+env $_env }$command $rc_flags $command_args"
		[ -z "$_user" ] || _doit="su -m $_user -c 'sh -c \"$_doit\"'"
		[ -z "$_nice" ] || _doit="nice -n $_nice $_doit"
		[ -z "$_prepend" ] || _doit="$_prepend $_doit"
		_doit="limits -C $_login_class $_limits $_doit"
		if [ -n "$_chdir" ]; then
			echo "chdir: $_chdir" >> "$STANDIN_LOG"
			cd "$STANDIN_ROOT$_chdir" || return 1
		fi
		if ! _standin_doit "$_doit"; then
			warn "failed to start $name"
			return 1
		fi
		return 0
		;;
	stop)
		if [ -z "$rc_pid" ]; then
			[ -n "$rc_fast" ] && return 0
			echo "$name not running?${pidfile:+ (check $pidfile).}" >&2
			return 1
		fi
		echo "Stopping $name."
		_doit="kill -${sig_stop:-TERM} $rc_pid"
		[ -z "$_user" ] || _doit="su -m $_user -c 'sh -c \"$_doit\"'"
		_standin_doit "$_doit" || return 1
		wait_for_pids "$rc_pid"
		;;
	restart)
		(run_rc_command "${_one:+one}stop")
		(run_rc_command "${_one:+one}start")
		;;
	*)
		echo "Usage: $0 [fast|force|one|quiet](start|stop|restart|status)" >&2
		return 1
		;;
	esac
}
