//! `gen`: deterministic test, demo and load data from `crate::gen` — a
//! snapshot file, the teacher ids, every entity's `created` event published
//! to Kafka, then optionally a steady trickle of changes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};

use super::{create, fail, progress, runtime, GenArgs};

pub(super) fn gen(args: GenArgs) -> ExitCode {
    let GenArgs {
        scale,
        seed,
        schools,
        classes_per_school,
        teachers_per_school,
        out,
        teacher_ids,
        brokers,
        skip_initial,
        trickle,
        duration_secs,
        malformed_per_mille,
    } = args;
    let mut spec = crate::gen::Spec::scale(&scale, seed).expect("clap checked the scale");
    spec.schools = schools.unwrap_or(spec.schools);
    spec.classes_per_school = classes_per_school.unwrap_or(spec.classes_per_school);
    spec.teachers_per_school = teachers_per_school.unwrap_or(spec.teachers_per_school);
    if out.is_none() && teacher_ids.is_none() && brokers.is_none() {
        eprintln!("emis-edge gen: nothing to do: give --out, --teacher-ids or --brokers");
        return ExitCode::from(2);
    }
    if brokers.is_none() && (trickle > 0 || skip_initial) {
        eprintln!("emis-edge gen: --trickle and --skip-initial need --brokers");
        return ExitCode::from(2);
    }
    let job = GenJob {
        province: crate::gen::Province::new(spec),
        out,
        teacher_ids,
        brokers,
        skip_initial,
        trickle,
        duration: duration_secs.map(Duration::from_secs),
        malformed_per_mille,
    };
    match generate(job) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// The checked options of `gen`: the province to generate and where it goes.
struct GenJob {
    province: crate::gen::Province,
    out: Option<PathBuf>,
    teacher_ids: Option<PathBuf>,
    brokers: Option<String>,
    skip_initial: bool,
    trickle: u32,
    duration: Option<Duration>,
    malformed_per_mille: u32,
}

fn generate(job: GenJob) -> anyhow::Result<()> {
    use std::io::Write;
    let p = &job.province;
    let schools = u64::from(p.spec.schools);
    if let Some(path) = &job.teacher_ids {
        let mut w = std::io::BufWriter::new(create(path)?);
        for s in 0..p.spec.schools {
            for t in 0..p.spec.teachers_per_school {
                writeln!(w, "{}", p.teacher_id(s, t))?;
            }
        }
        w.flush()?;
        eprintln!(
            "emis-edge gen: {} teacher ids written to {}",
            p.spec.teachers(),
            path.display()
        );
    }
    if let Some(path) = &job.out {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, create(path)?);
        let mut tick = progress(Some(schools), "schools written");
        let records = p.write_snapshot(&mut w, |done| tick(u64::from(done)))?;
        w.flush()?;
        eprintln!(
            "emis-edge gen: {records} records of {schools} schools written to {}",
            path.display()
        );
    }
    let Some(brokers) = &job.brokers else {
        return Ok(());
    };
    let publisher = crate::gen::Publisher::connect(brokers, &Default::default())?;
    if !job.skip_initial {
        let mut tick = progress(Some(schools), "schools published");
        let mut sent = 0u64;
        for s in 0..p.spec.schools {
            for e in p.school(s) {
                publisher.send(&crate::gen::Message::of(&p.created_event(e)))?;
                sent += 1;
            }
            tick(u64::from(s) + 1);
        }
        publisher.flush(Duration::from_secs(300))?;
        eprintln!("emis-edge gen: {sent} events published to {brokers}");
    }
    if job.trickle > 0 {
        let rt = runtime()?;
        let (sent, malformed) = rt.block_on(async {
            let mut trickle =
                crate::gen::Trickle::new(p.clone(), SystemClock.now(), job.malformed_per_mille);
            let started = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut shutdown = std::pin::pin!(crate::node::shutdown_signal());
            let (mut sent, mut malformed) = (0u64, 0u64);
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tick.tick() => {}
                }
                let elapsed = started.elapsed();
                if job.duration.is_some_and(|d| elapsed >= d) {
                    break;
                }
                let due = (elapsed.as_secs_f64() * f64::from(job.trickle)) as u64;
                while sent < due {
                    let m = trickle.next_message();
                    malformed += u64::from(m.malformed);
                    publisher.send(&m)?;
                    sent += 1;
                }
            }
            anyhow::Ok((sent, malformed))
        })?;
        publisher.flush(Duration::from_secs(60))?;
        eprintln!("emis-edge gen: {sent} changes published ({malformed} malformed)");
    }
    Ok(())
}
