/**
 * The session's Slurm jobs in JupyterLab: the time left of the server's job
 * and of each kernel's job in the status bar, counted down between asks;
 * warnings at the admin's times before an end, saying what happens then; a
 * kernel whose job waits says why, its place in the queue and its expected
 * start, in a notification kept up to date until the job runs.
 *
 * It asks the server's `chspawner/api/session` (chspawner.persist.session_status)
 * every `poll_seconds`, every `pending_poll_seconds` while a kernel's job
 * waits or a kernel starts. A server without that endpoint (not started by
 * chspawner's spawners) answers 404: nothing is shown, nothing asked again.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Notification } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import {
  ISessionStatus,
  KernelNames,
  Warnings,
  kernelWarning,
  pollDelayMs,
  secondsLeft,
  serverWarning,
  statusText,
  statusTitle,
  waitingNotice
} from './sessiontime';

const PLUGIN_ID = '@chspawner/jupyterlab-persist:session';
const ENDPOINT = 'chspawner/api/session';
/** How long a kernel starting keeps the asks frequent (its job may queue). */
const BUSY_MS = 60_000;

/** The status bar item: one line of text, its title the full words; a click asks again. */
class SessionItem extends Widget {
  constructor(onClick: () => void) {
    super();
    this.addClass('chspawner-SessionStatus');
    this.node.style.cursor = 'pointer';
    this.node.style.whiteSpace = 'nowrap';
    this.node.style.overflow = 'hidden';
    this.node.style.textOverflow = 'ellipsis';
    this.node.style.maxWidth = '60vw';
    this.node.style.padding = '0 5px';
    this.node.addEventListener('click', onClick);
  }

  setText(text: string, title: string): void {
    if (this.node.textContent !== text) {
      this.node.textContent = text;
    }
    if (this.node.title !== title) {
      this.node.title = title;
    }
  }
}

class SessionStatusView {
  constructor(private readonly _app: JupyterFrontEnd) {}

  /** The status bar's item (none without a status bar). */
  item: SessionItem | null = null;
  status: ISessionStatus | null = null;
  /** The status bar asks `active` again when this says so. */
  get activeChanged(): ISignal<this, void> {
    return this._activeChanged;
  }
  private _activeChanged = new Signal<this, void>(this);
  private _wasActive = false;
  private _lastNames: KernelNames = {};
  /** The page's clock minus the server's, from the last answer. */
  private _skew = 0;
  private _timer: ReturnType<typeof setTimeout> | null = null;
  private _ticker: ReturnType<typeof setInterval> | null = null;
  private _busyUntil = 0;
  private _stopped = false;
  private _asking = false;
  private _warnings = new Warnings();
  private _said = new Set<string>();
  /** Notification ids of kernels whose job waits, and what each says. */
  private _waiting = new Map<string, { id: string; message: string }>();

  get active(): boolean {
    return this.status !== null && (this.status.server !== null || this.status.kernels.length > 0);
  }

  /** The server's clock, as the page's counts it on. */
  now(): number {
    return Date.now() / 1000 - this._skew;
  }

  /** Ask now (a click, a kernel starting); `busy`: ask often for a while. */
  kick(busy = false): void {
    if (busy) {
      this._busyUntil = Date.now() + BUSY_MS;
    }
    this._schedule(busy ? 1000 : 0);
  }

  start(): void {
    this._schedule(0);
    this._ticker = setInterval(() => this._render(), 1000);
  }

  private _schedule(ms: number): void {
    if (this._stopped) {
      return;
    }
    if (this._timer !== null) {
      clearTimeout(this._timer);
    }
    this._timer = setTimeout(() => void this._ask(), ms);
  }

  private async _ask(): Promise<void> {
    this._timer = null;
    if (this._asking) {
      return; // (the answer under way schedules the next)
    }
    this._asking = true;
    try {
      const settings = this._app.serviceManager.serverSettings;
      const response = await ServerConnection.makeRequest(
        settings.baseUrl + ENDPOINT, { cache: 'no-store' }, settings);
      if (response.status === 404) {
        console.info('[chspawner] this server has no session status (not chspawner\'s spawner)');
        this._stop();
        return;
      }
      if (response.ok) {
        const status = (await response.json()) as ISessionStatus;
        this._skew = Date.now() / 1000 - status.now;
        this.status = status;
        this._render();
        this._notify(await this._names());
        this._say(status);
      }
    } catch (error) {
      console.warn('[chspawner] the session status could not be asked:', error);
    } finally {
      this._asking = false;
    }
    this._schedule(pollDelayMs(this.status, Date.now() < this._busyUntil));
  }

  private _stop(): void {
    this._stopped = true;
    if (this._ticker !== null) {
      clearInterval(this._ticker);
    }
    this.status = null;
    this._render();
  }

  private _render(): void {
    const status = this.status;
    if (this.active !== this._wasActive) {
      this._wasActive = this.active;
      this._activeChanged.emit();
    }
    if (status === null || !this.active) {
      this.item?.setText('', '');
      return;
    }
    const now = this.now();
    this.item?.setText(statusText(status, now), statusTitle(status, now, this._lastNames));
    this._warn(now);
  }

  /** The notebook (or console) each kernel serves, for the words. */
  private async _names(): Promise<KernelNames> {
    const names: KernelNames = {};
    try {
      for (const session of this._app.serviceManager.sessions.running()) {
        if (session.kernel) {
          names[session.kernel.id] = session.name || session.path;
        }
      }
    } catch {
      // (names are a nicety)
    }
    this._lastNames = names;
    return names;
  }

  /** Warnings due at `now` (also between asks, as the time counts down). */
  private _warn(now: number): void {
    const status = this.status;
    if (status === null) {
      return;
    }
    const keys: string[] = [];
    if (status.server !== null) {
      const left = secondsLeft(status.server, now);
      const key = `server:${status.server.job_id}`;
      keys.push(key);
      if (left !== null && this._warnings.due(key, left, status.warn_minutes) !== null) {
        Notification.warning(serverWarning(status.server, left, now), { autoClose: false });
      }
    }
    for (const kernel of status.kernels) {
      const left = secondsLeft(kernel, now);
      const key = `kernel:${kernel.job_id}`;
      keys.push(key);
      if (left !== null && this._warnings.due(key, left, status.warn_minutes) !== null) {
        Notification.warning(kernelWarning(kernel, left, now, this._lastNames),
                             { autoClose: false });
      }
    }
    this._warnings.keepOnly(keys);
  }

  /** The server's notices (why the last job ended, a move), once each. */
  private _say(status: ISessionStatus): void {
    for (const notice of status.notices ?? []) {
      if (!this._said.has(notice.id)) {
        this._said.add(notice.id);
        Notification.info(notice.text, { autoClose: false });
      }
    }
  }

  /** A notification per kernel whose job waits, kept to the server's words;
   *  dismissed once the job runs (or is gone). */
  private _notify(names: KernelNames): void {
    const status = this.status;
    const waiting = new Set<string>();
    for (const kernel of status?.kernels ?? []) {
      if (kernel.state !== 'pending' || !kernel.waiting) {
        continue;
      }
      waiting.add(kernel.kernel_id);
      const message = waitingNotice(kernel, names);
      const shown = this._waiting.get(kernel.kernel_id);
      if (shown === undefined) {
        const id = Notification.emit(message, 'in-progress', { autoClose: false });
        this._waiting.set(kernel.kernel_id, { id, message });
      } else if (shown.message !== message) {
        Notification.update({ id: shown.id, message, type: 'in-progress', autoClose: false });
        shown.message = message;
      }
    }
    for (const [kernelId, shown] of [...this._waiting]) {
      if (!waiting.has(kernelId)) {
        Notification.dismiss(shown.id);
        this._waiting.delete(kernelId);
      }
    }
  }
}

/** A notebook whose kernel starts (or restarts) may be about to queue a job. */
function followNotebook(panel: NotebookPanel, view: SessionStatusView): void {
  const context = panel.sessionContext;
  context.kernelChanged.connect(() => view.kick(true));
  context.statusChanged.connect((_, status) => {
    if (status === 'starting' || status === 'restarting' || status === 'autorestarting') {
      view.kick(true);
    }
  });
}

function activate(app: JupyterFrontEnd, statusBar: IStatusBar | null,
                  tracker: INotebookTracker | null): void {
  const view = new SessionStatusView(app);
  if (statusBar !== null) {
    const item = (view.item = new SessionItem(() => view.kick()));
    statusBar.registerStatusItem(PLUGIN_ID, {
      item,
      align: 'left',
      rank: 1000, // (after JupyterLab's own: the kernel's name and state)
      isActive: () => view.active,
      activeStateChanged: view.activeChanged
    });
  }
  if (tracker !== null) {
    tracker.forEach(panel => followNotebook(panel, view));
    tracker.widgetAdded.connect((_, panel) => followNotebook(panel, view));
  }
  view.start();
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description:
    "The session's Slurm jobs: time left, warnings before their end, a waiting " +
    "kernel's job explained",
  autoStart: true,
  optional: [IStatusBar, INotebookTracker],
  activate
};

export default plugin;
