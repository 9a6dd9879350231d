//! Files generated from the code and committed, because the Debian
//! package (cargo-deb runs no generator) ships them: the man pages and the
//! shell completions, both from the clap definitions. Each test here
//! renders them again and fails when a committed file differs, so they
//! cannot drift from `emis-edge --help`; with `EMIS_EDGE_WRITE_GENERATED=1`
//! it writes them instead.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use emis_edge::cli::Cli;

const REFRESH: &str = "EMIS_EDGE_WRITE_GENERATED=1 cargo test --test it generated::";

fn packaging(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join(path)
}

fn writing() -> bool {
    std::env::var_os("EMIS_EDGE_WRITE_GENERATED").is_some_and(|v| v == "1")
}

fn gunzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out)?;
    Ok(out)
}

/// gzip with no name and time in the header, so that the same page gives
/// the same bytes.
fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Compares (or, when refreshing, writes) each generated file; `gz` files
/// are compared by content, so another gzip implementation's bytes do not
/// count as drift. Every stale file is named in one failure.
fn check(files: &[(PathBuf, Vec<u8>)]) {
    let mut stale = Vec::new();
    for (path, content) in files {
        let gz = path.extension().is_some_and(|e| e == "gz");
        if writing() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let bytes = if gz { gzip(content) } else { content.clone() };
            std::fs::write(path, bytes).unwrap();
            continue;
        }
        let committed = std::fs::read(path).and_then(|b| if gz { gunzip(&b) } else { Ok(b) });
        if committed.ok().as_ref() != Some(content) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "generated files differ from what the current command line produces (or are \
         missing): {stale:#?}\nrefresh them with `{REFRESH}` and commit them"
    );
}

/// The sections clap does not know: files the package installs, and where
/// to read on.
const MAIN_PAGE_TAIL: &str = r#".SH FILES
.TP
\fI/etc/emis\-edge/edge.toml\fR
The configuration (see \fI/usr/share/doc/emis\-edge/edge.example.toml\fR for every key).
.TP
\fI/var/lib/emis\-edge/emis\-edge.redb\fR
The local replica (one redb file in \fBnode.data_dir\fR).
.TP
\fI/usr/share/emis\-edge/prometheus/emis\-edge.rules.yml\fR
Prometheus alert rules for the node's metrics.
.TP
\fI/usr/share/emis\-edge/grafana/emis\-edge.json\fR
A Grafana dashboard over the node's metrics, to import as it is.
.SH "SEE ALSO"
\fBemis\-edge\-serve\fR(1), \fBemis\-edge\-status\fR(1), \fBsystemctl\fR(1),
\fBjournalctl\fR(1), and the operator's guide
\fI/usr/share/doc/emis\-edge/OPERATIONS.md\fR. While the node runs, its status
page answers at \fBhttp://\fR\fIhttp.listen\fR\fB/\fR in a browser.
"#;

/// `emis-edge.1` and one page per subcommand (`emis-edge-serve.1`, …),
/// which the main page's list of commands refers to.
fn man_pages() -> Vec<(PathBuf, Vec<u8>)> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    let render = |cmd: clap::Command, tail: &str| {
        let man = clap_mangen::Man::new(cmd)
            .source(concat!("emis-edge ", env!("CARGO_PKG_VERSION")))
            .manual("EMIS edge node");
        let name = man.get_filename();
        let mut out = Vec::new();
        man.render(&mut out).unwrap();
        out.extend_from_slice(tail.as_bytes());
        (packaging(&format!("man/{name}.gz")), out)
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages.push(render(sub.clone(), ""));
    }
    pages.push(render(cmd, MAIN_PAGE_TAIL));
    pages
}

fn completions() -> Vec<(PathBuf, Vec<u8>)> {
    [
        (Shell::Bash, "emis-edge.bash"),
        (Shell::Zsh, "_emis-edge"),
        (Shell::Fish, "emis-edge.fish"),
    ]
    .into_iter()
    .map(|(shell, file)| {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "emis-edge", &mut out);
        (packaging(&format!("completions/{file}")), out)
    })
    .collect()
}

#[test]
fn the_man_pages_are_what_the_command_line_defines() {
    let pages = man_pages();
    check(&pages);
    let names: Vec<String> = pages
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "emis-edge.1.gz",
        "emis-edge-serve.1.gz",
        "emis-edge-import.1.gz",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected}: {names:?}");
    }
    // No page is left over from a subcommand that no longer exists (the
    // package installs every page in the folder).
    let on_disk: Vec<String> = std::fs::read_dir(packaging("man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let extra: Vec<&String> = on_disk.iter().filter(|n| !names.contains(n)).collect();
    assert!(
        extra.is_empty(),
        "packaging/man holds pages of no current command: {extra:?}; delete them"
    );

    // What `man emis-edge` shows a person: the commands, the exit codes, the
    // files; and groff (with preconv for UTF-8, as man runs it) finds nothing
    // to warn about.
    let main = &pages.last().unwrap().1;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("emis-edge.1");
    std::fs::write(&file, main).unwrap();
    let shown = std::process::Command::new("groff")
        // Old-style overstriking (no escape sequences), removed below.
        // Left-adjusted, unhyphenated, so that phrases are found whole.
        .args(["-k", "-man", "-Tutf8", "-ww", "-P-c", "-dAD=l", "-rHY=0"])
        .arg(&file)
        .output();
    match shown {
        Ok(out) => {
            let warnings = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && warnings.is_empty(), "{warnings}");
            // "X\bX" is a bold X, "_\bX" an underlined one: keep the X.
            let chars: Vec<char> = String::from_utf8_lossy(&out.stdout).chars().collect();
            let text: String = (0..chars.len())
                .filter(|&i| chars[i] != '\u{8}' && chars.get(i + 1) != Some(&'\u{8}'))
                .map(|i| {
                    if chars[i] == '\u{2010}' {
                        '-'
                    } else {
                        chars[i]
                    }
                })
                .collect::<String>()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            for seen in [
                "emis-edge-check-config(1)",
                "Exit codes: 0 success, 2 bad usage",
                "/etc/emis-edge/edge.toml",
                "OPERATIONS.md",
            ] {
                assert!(text.contains(seen), "{seen:?} not in the man page:\n{text}");
            }
        }
        Err(_) => assert!(
            std::env::var_os("EMIS_EDGE_SKIP_GROFF").is_some_and(|v| v == "1"),
            "groff is needed to check the man page (apt-get install groff-base), or set \
             EMIS_EDGE_SKIP_GROFF=1"
        ),
    }
}

#[test]
fn the_shell_completions_are_what_the_command_line_defines() {
    let files = completions();
    check(&files);
    let bash = String::from_utf8_lossy(&files[0].1);
    for word in ["check-config", "--dry-run", "--school"] {
        assert!(bash.contains(word), "{word} not completed by bash");
    }
}
