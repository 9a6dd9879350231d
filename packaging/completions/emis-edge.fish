# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_emis_edge_global_optspecs
    string join \n h/help V/version
end

function __fish_emis_edge_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_emis_edge_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_emis_edge_using_subcommand
    set -l cmd (__fish_emis_edge_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c emis-edge -n "__fish_emis_edge_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c emis-edge -n "__fish_emis_edge_needs_command" -s V -l version -d 'Print version'
complete -c emis-edge -n "__fish_emis_edge_needs_command" -f -a "serve" -d 'Run the node: consume events, keep the store, serve HTTP, until SIGTERM/SIGINT'
complete -c emis-edge -n "__fish_emis_edge_needs_command" -f -a "check-config" -d 'Validate a configuration file (with environment overrides) and print the effective configuration, secrets redacted. Exit 0 if valid, 2 if not'
complete -c emis-edge -n "__fish_emis_edge_needs_command" -f -a "status" -d 'Print the sync status: per-partition lag, last event, last resync, dead letters, staleness. Asks the running node over HTTP (http.listen); when none runs, reads the store file directly'
complete -c emis-edge -n "__fish_emis_edge_needs_command" -f -a "resync" -d 'Run one resync now: fetch each served school\'s snapshot from resync.central_url and reconcile (all or nothing per school). Through the running node if there is one, else on the store directly'
complete -c emis-edge -n "__fish_emis_edge_needs_command" -f -a "export" -d 'Write schools\' snapshots (NDJSON, the snapshot format) to a file, e.g. for a USB stick. Through the running node if there is one'
complete -c emis-edge -n "__fish_emis_edge_needs_command" -f -a "demo" -d 'DEMO: run a node against an in-process Kafka cluster fed with a generated province; prints curl commands with real ids and keeps publishing changes (and a few malformed events) until Ctrl-C. Needs nothing installed; not for production'
complete -c emis-edge -n "__fish_emis_edge_needs_command" -f -a "gen" -d 'Generate realistic Vietnamese EMIS data, deterministically from a seed: a snapshot file for `import` (--out), every entity\'s `created` event published to a broker (--brokers), then optionally a steady trickle of changes (--trickle), and the teacher ids for load scripts (--teacher-ids). For tests, benchmarks and load tests'
complete -c emis-edge -n "__fish_emis_edge_needs_command" -f -a "compact" -d 'Give the store file\'s free pages back to the file system (redb\'s compaction), on a stopped node: exit 1 if a node answers at http.listen. Prints the file\'s size before and after. A running node compacts by itself at start when the free share is at least store.compact_at_free_share; an offline import compacts when done'
complete -c emis-edge -n "__fish_emis_edge_needs_command" -f -a "import" -d 'Load a snapshot file (from `export` or central) into the store: all or nothing per school; a truncated or corrupt school changes nothing and its line is named. Through the running node if there is one'
complete -c emis-edge -n "__fish_emis_edge_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand serve" -l config -d 'Configuration file. Without it, /etc/emis-edge/edge.toml is read if it exists, else the built-in defaults apply' -r -F
complete -c emis-edge -n "__fish_emis_edge_using_subcommand serve" -s h -l help -d 'Print help'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand check-config" -l config -d 'The configuration file to check' -r -F
complete -c emis-edge -n "__fish_emis_edge_using_subcommand check-config" -s h -l help -d 'Print help'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand status" -l config -d 'Configuration file (default as for `serve`)' -r -F
complete -c emis-edge -n "__fish_emis_edge_using_subcommand status" -l json -d 'Print the status document as JSON instead of a summary'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand status" -l tables -d 'Also print where the store file\'s bytes go, per table: entries, stored bytes, B-tree overhead, unused page space, pages; and the file\'s allocated size and free share. On a stopped node this reads the whole file'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand status" -s h -l help -d 'Print help'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand resync" -l config -d 'Configuration file' -r -F
complete -c emis-edge -n "__fish_emis_edge_using_subcommand resync" -l school -d 'Only this school (repeatable); default: every served school' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand resync" -l dry-run -d 'Change nothing; report per school and entity kind what is missing, extra, older or newer locally (drift audit)'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand resync" -s h -l help -d 'Print help'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand export" -l config -d 'Configuration file' -r -F
complete -c emis-edge -n "__fish_emis_edge_using_subcommand export" -l school -d 'A school to export (repeatable); default: every served school' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand export" -l out -d 'The file to write' -r -F
complete -c emis-edge -n "__fish_emis_edge_using_subcommand export" -s h -l help -d 'Print help'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand demo" -l scale -d 'Data-set size: tiny, demo (1,000 teachers), province (100,000 teachers, 1.1 M events), national' -r -f -a "tiny\t''
demo\t''
province\t''
national\t''"
complete -c emis-edge -n "__fish_emis_edge_using_subcommand demo" -l seed -d 'Seed of the generator; the same seed gives the same ids' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand demo" -l listen -d 'Where the demo node answers HTTP (port 0: any free port)' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand demo" -l data-dir -d 'Keep the store in this directory after the demo (it must not hold a store yet; default: a temporary directory removed at the end)' -r -F
complete -c emis-edge -n "__fish_emis_edge_using_subcommand demo" -l rate -d 'Changes published per second after the initial load (0: none)' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand demo" -l malformed-per-mille -d 'Of every thousand changes published, how many are malformed' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand demo" -l followers -d 'Also start N school nodes (in-process, each on its own port and temporary store) that follow this provincial node\'s change feed, one school each' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand demo" -s h -l help -d 'Print help'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand gen" -l scale -d 'Data-set size: tiny (3 schools), demo (25 schools, 1,000 teachers), province (1,000 schools: 100,000 teachers and classes, ~1 M assignments), national (10,000 schools)' -r -f -a "tiny\t''
demo\t''
province\t''
national\t''"
complete -c emis-edge -n "__fish_emis_edge_using_subcommand gen" -l seed -d 'Seed of the generator; the same seed gives the same data' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand gen" -l schools -d 'Override the scale\'s number of schools' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand gen" -l classes-per-school -d 'Override the scale\'s classes per school' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand gen" -l teachers-per-school -d 'Override the scale\'s teachers per school' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand gen" -l out -d 'Write a snapshot file (contract §3) of every school' -r -F
complete -c emis-edge -n "__fish_emis_edge_using_subcommand gen" -l teacher-ids -d 'Write every teacher id, one per line' -r -F
complete -c emis-edge -n "__fish_emis_edge_using_subcommand gen" -l brokers -d 'Publish to these Kafka brokers (the contract\'s default topics)' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand gen" -l trickle -d 'With --brokers: then publish this many changes per second' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand gen" -l duration-secs -d 'Stop the trickle after this many seconds (default: at Ctrl-C)' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand gen" -l malformed-per-mille -d 'Of every thousand trickled changes, how many are malformed' -r
complete -c emis-edge -n "__fish_emis_edge_using_subcommand gen" -l skip-initial -d 'With --brokers: do not publish the data set, only the trickle'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand gen" -s h -l help -d 'Print help'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand compact" -l config -d 'Configuration file' -r -F
complete -c emis-edge -n "__fish_emis_edge_using_subcommand compact" -s h -l help -d 'Print help'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand import" -l config -d 'Configuration file' -r -F
complete -c emis-edge -n "__fish_emis_edge_using_subcommand import" -s h -l help -d 'Print help'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand help; and not __fish_seen_subcommand_from serve check-config status resync export demo gen compact import help" -f -a "serve" -d 'Run the node: consume events, keep the store, serve HTTP, until SIGTERM/SIGINT'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand help; and not __fish_seen_subcommand_from serve check-config status resync export demo gen compact import help" -f -a "check-config" -d 'Validate a configuration file (with environment overrides) and print the effective configuration, secrets redacted. Exit 0 if valid, 2 if not'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand help; and not __fish_seen_subcommand_from serve check-config status resync export demo gen compact import help" -f -a "status" -d 'Print the sync status: per-partition lag, last event, last resync, dead letters, staleness. Asks the running node over HTTP (http.listen); when none runs, reads the store file directly'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand help; and not __fish_seen_subcommand_from serve check-config status resync export demo gen compact import help" -f -a "resync" -d 'Run one resync now: fetch each served school\'s snapshot from resync.central_url and reconcile (all or nothing per school). Through the running node if there is one, else on the store directly'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand help; and not __fish_seen_subcommand_from serve check-config status resync export demo gen compact import help" -f -a "export" -d 'Write schools\' snapshots (NDJSON, the snapshot format) to a file, e.g. for a USB stick. Through the running node if there is one'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand help; and not __fish_seen_subcommand_from serve check-config status resync export demo gen compact import help" -f -a "demo" -d 'DEMO: run a node against an in-process Kafka cluster fed with a generated province; prints curl commands with real ids and keeps publishing changes (and a few malformed events) until Ctrl-C. Needs nothing installed; not for production'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand help; and not __fish_seen_subcommand_from serve check-config status resync export demo gen compact import help" -f -a "gen" -d 'Generate realistic Vietnamese EMIS data, deterministically from a seed: a snapshot file for `import` (--out), every entity\'s `created` event published to a broker (--brokers), then optionally a steady trickle of changes (--trickle), and the teacher ids for load scripts (--teacher-ids). For tests, benchmarks and load tests'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand help; and not __fish_seen_subcommand_from serve check-config status resync export demo gen compact import help" -f -a "compact" -d 'Give the store file\'s free pages back to the file system (redb\'s compaction), on a stopped node: exit 1 if a node answers at http.listen. Prints the file\'s size before and after. A running node compacts by itself at start when the free share is at least store.compact_at_free_share; an offline import compacts when done'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand help; and not __fish_seen_subcommand_from serve check-config status resync export demo gen compact import help" -f -a "import" -d 'Load a snapshot file (from `export` or central) into the store: all or nothing per school; a truncated or corrupt school changes nothing and its line is named. Through the running node if there is one'
complete -c emis-edge -n "__fish_emis_edge_using_subcommand help; and not __fish_seen_subcommand_from serve check-config status resync export demo gen compact import help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
