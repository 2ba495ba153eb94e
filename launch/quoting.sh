# Sourced by the launchers: `quoted WORD...` prints the words joined by spaces, each
# single-quoted only if the shell would otherwise split or expand it.
quoted() {
  local word out=()
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}
