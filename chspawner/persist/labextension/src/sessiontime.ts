/**
 * The pure side of the session's status (session.ts shows it): what the
 * server's `chspawner/api/session` answers, the status bar's words counted
 * down between answers, when a warning is due, how often to ask.
 *
 * Every sentence about a job comes from the server (chspawner.slurm_words:
 * why a job waits, what happens at its end); here only durations and clock
 * times are formatted, as the server's own `duration` does.
 */

/** A job of the session: the server's own, or a kernel's. */
export interface IJobStatus {
  job_id: string;
  node?: string;
  /** "pending", "running" (the server's: also "unknown": Slurm didn't say). */
  state: string;
  /** Epoch seconds its time limit ends it (running, with a limit), or null. */
  end_time: number | null;
  /** The server's words for the time left, as of its `now`. */
  time_left: string | null;
  /** What happens at the end, in words ("your server stops then: ..."). */
  at_end: string;
}

export interface IKernelJobStatus extends IJobStatus {
  kernel_id: string;
  /** Why it waits, its place, its expected start (pending), else null. */
  waiting: string | null;
  /** The same without Slurm's own word for why (where room is short). */
  waiting_brief?: string | null;
}

/** GET chspawner/api/session's answer. */
export interface ISessionStatus {
  /** The server's clock, epoch seconds. */
  now: number;
  /** Minutes before an end to warn at, largest first. */
  warn_minutes: number[];
  poll_seconds?: number;
  pending_poll_seconds?: number;
  server: IJobStatus | null;
  kernels: IKernelJobStatus[];
  /** Said once: why the last server's job ended, a planned move. */
  notices?: { id: string; text: string }[];
}

export const DEFAULT_POLL_SECONDS = 30;
export const DEFAULT_PENDING_POLL_SECONDS = 5;

/** "2 h 05 min", "14 min", "40 s" (as chspawner.slurm_words.duration). */
export function duration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  const hours = Math.floor(s / 3600);
  const minutes = Math.floor((s % 3600) / 60);
  if (hours) {
    return `${hours} h ${String(minutes).padStart(2, '0')} min`;
  }
  if (minutes) {
    return `${minutes} min`;
  }
  return `${s % 60} s`;
}

/** A time left, to the nearest minute, for a warning: "15 min", "1 h 00 min". */
export function roundedDuration(seconds: number): string {
  if (seconds < 60) {
    return duration(seconds);
  }
  return duration(Math.round(seconds / 60) * 60);
}

const DAYS = ['Sun', 'Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat'];
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov',
  'Dec'];

/** A time soon, on the page's clock: "14:05", or "Tue 06 Jan 14:05" when not today. */
export function clock(epoch: number, now: number): string {
  const t = new Date(epoch * 1000);
  const today = new Date(now * 1000);
  const hm = `${pad(t.getHours())}:${pad(t.getMinutes())}`;
  if (t.getFullYear() === today.getFullYear() && t.getMonth() === today.getMonth() &&
      t.getDate() === today.getDate()) {
    return hm;
  }
  return `${DAYS[t.getDay()]} ${pad(t.getDate())} ${MONTHS[t.getMonth()]} ${hm}`;
}

function pad(n: number): string {
  return String(n).padStart(2, '0');
}

/** Seconds a running job has left at `now`, or null (no limit known, not running). */
export function secondsLeft(job: IJobStatus, now: number): number | null {
  if (job.state !== 'running' || job.end_time === null || job.end_time === undefined) {
    return null;
  }
  return Math.max(0, job.end_time - now);
}

/** A kernel's name for the user: its notebook's, where the page knows it. */
export type KernelNames = Record<string, string | undefined>;

function kernelWho(kernel: IKernelJobStatus, names: KernelNames): string {
  const name = names[kernel.kernel_id];
  return name ? `the kernel of ${name}` : 'your kernel';
}

/** The status bar's line: "Job 1234: 1 h 05 min left · Kernel job 1240 waits: ...". */
export function statusText(status: ISessionStatus, now: number): string {
  const parts: string[] = [];
  if (status.server !== null) {
    const left = secondsLeft(status.server, now);
    if (left !== null) {
      parts.push(`Job ${status.server.job_id}: ${duration(left)} left`);
    }
  }
  for (const kernel of status.kernels) {
    if (kernel.state === 'pending' && kernel.waiting) {
      parts.push(`Kernel ${kernel.waiting_brief || kernel.waiting}`);
    } else {
      const left = secondsLeft(kernel, now);
      if (left !== null) {
        parts.push(`Kernel job ${kernel.job_id}: ${duration(left)} left`);
      }
    }
  }
  return parts.join(' · ');
}

/** The status bar item's title: every job, in full words. */
export function statusTitle(status: ISessionStatus, now: number,
                            names: KernelNames = {}): string {
  const lines: string[] = [];
  const describe = (job: IJobStatus): string => {
    const on = job.node ? ` on node ${job.node}` : '';
    const left = secondsLeft(job, now);
    if (left === null || job.end_time === null) {
      return `Slurm job ${job.job_id}${on}`;
    }
    return `Slurm job ${job.job_id}${on}: ${duration(left)} left (until ` +
      `${clock(job.end_time, now)}): ${job.at_end}.`;
  };
  if (status.server !== null) {
    lines.push(`Your server: ${describe(status.server)}`);
  }
  for (const kernel of status.kernels) {
    const who = capitalize(kernelWho(kernel, names));
    if (kernel.state === 'pending' && kernel.waiting) {
      lines.push(`${who}: ${kernel.waiting}.`);
    } else {
      lines.push(`${who}: ${describe(kernel)}`);
    }
  }
  lines.push('(Click to ask Slurm again.)');
  return lines.join('\n');
}

/** "Your server's job ends in 15 min (at 14:05): <what happens then>." */
export function warningText(who: string, left: number, end: number, atEnd: string,
                            now: number): string {
  return `${who} ends in ${roundedDuration(left)} (at ${clock(end, now)}): ${atEnd}.`;
}

/** The warning of the server's job. */
export function serverWarning(job: IJobStatus, left: number, now: number): string {
  return warningText("Your server's job", left, job.end_time ?? now + left, job.at_end, now);
}

/** The warning of a kernel's job. */
export function kernelWarning(kernel: IKernelJobStatus, left: number, now: number,
                              names: KernelNames = {}): string {
  const who = `The job of ${kernelWho(kernel, names)} (Slurm job ${kernel.job_id})`;
  return warningText(who, left, kernel.end_time ?? now + left, kernel.at_end, now);
}

/**
 * The notification of a kernel whose job waits: the server's brief words
 * first (JupyterLab shows a notification's first 140 characters; the
 * notification center, all), then whose kernel it is.
 */
export function waitingNotice(kernel: IKernelJobStatus, names: KernelNames = {}): string {
  const name = names[kernel.kernel_id];
  return `Kernel ${kernel.waiting_brief || kernel.waiting}` + (name ? ` (${name})` : '');
}

function capitalize(text: string): string {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

/**
 * Which warnings were given, per job: each of the admin's times once per
 * job, when the time left falls to it. Time left that grows again past a
 * time (the job's limit raised) makes that warning due again.
 */
export class Warnings {
  private _given = new Map<string, Set<number>>();

  /**
   * The warning time (minutes) due for job `key` with `left` seconds left,
   * or null. Several passed at once (a limit cut, a page opened late): the
   * smallest, the one that says most; the others count as given.
   */
  due(key: string, left: number, minutes: number[]): number | null {
    let given = this._given.get(key);
    if (given === undefined) {
      given = new Set();
      this._given.set(key, given);
    }
    for (const m of [...given]) {
      if (left > m * 60) {
        given.delete(m); // (more time again: warn again when it comes)
      }
    }
    if (left <= 0) {
      return null; // (ended: the end has its own notice)
    }
    const passed = minutes.filter(m => m > 0 && left <= m * 60);
    const fresh = passed.filter(m => !given!.has(m));
    if (fresh.length === 0) {
      return null;
    }
    for (const m of passed) {
      given.add(m);
    }
    return Math.min(...fresh);
  }

  /** Forget jobs not in `keys` (ended). */
  keepOnly(keys: Iterable<string>): void {
    const keep = new Set(keys);
    for (const key of [...this._given.keys()]) {
      if (!keep.has(key)) {
        this._given.delete(key);
      }
    }
  }
}

/** Milliseconds until the next ask: sooner while a kernel's job waits, or
 *  while `busy` (a kernel starting, whose job may be about to queue). */
export function pollDelayMs(status: ISessionStatus | null, busy = false): number {
  const idle = status?.poll_seconds ?? DEFAULT_POLL_SECONDS;
  const pending = status?.pending_poll_seconds ?? DEFAULT_PENDING_POLL_SECONDS;
  const waiting = status?.kernels.some(k => k.state === 'pending') ?? false;
  return 1000 * Math.max(1, waiting || busy ? Math.min(pending, idle) : idle);
}
