/**
 * Reconnecting a kernel connection JupyterLab gave up on.
 *
 * JupyterLab 4's KernelConnection retries a broken kernel websocket seven
 * times, at random delays up to 2^n - 1 seconds (about two minutes in all),
 * then sets its connection status to 'disconnected' and stays there: a laptop
 * closed for a while, or a network away for minutes, comes back to a
 * notebook that no longer hears its kernel. This tries again, through the
 * connection's own reconnect() (which runs JupyterLab's seven tries afresh):
 * at once when the browser says it is back online or the page is shown
 * again, and otherwise after a delay that doubles from one second up to a
 * minute. Pure: the connection and the timers are passed in, so the unit
 * tests drive it without JupyterLab or a browser.
 */

/** What of JupyterLab's Kernel.IKernelConnection this needs. */
export interface IConnectionLike {
  readonly connectionStatus: string;
  readonly status: string;
  readonly isDisposed: boolean;
  reconnect(): Promise<void>;
}

/** Timers and the browser's idea of being online. */
export interface IClock {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
  online(): boolean;
}

export const browserClock: IClock = {
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: handle => clearTimeout(handle as ReturnType<typeof setTimeout>),
  online: () => typeof navigator === 'undefined' || navigator.onLine !== false
};

export const FIRST_RETRY_MS = 1000;
export const MAX_RETRY_MS = 60_000;

export class Reconnector {
  constructor(
    private readonly _kernel: IConnectionLike,
    private readonly _clock: IClock = browserClock
  ) {}

  /** JupyterLab's connection status changed to ``status``. */
  statusChanged(status: string): void {
    if (status === 'disconnected') {
      this._later();
    } else if (status === 'connected') {
      this._cancel();
      this._delay = FIRST_RETRY_MS;
    }
  }

  /** The browser is back online, or the page shown again: try now if given up. */
  nudge(): void {
    if (this._givenUp()) {
      this._cancel();
      this._tryNow();
    }
  }

  dispose(): void {
    this._disposed = true;
    this._cancel();
  }

  /** Tries made so far (for the browser's console, and the tests). */
  tries = 0;

  private _givenUp(): boolean {
    const k = this._kernel;
    return (
      !this._disposed && !k.isDisposed && k.status !== 'dead' && k.connectionStatus === 'disconnected'
    );
  }

  private _tryNow(): void {
    this._timer = undefined;
    if (!this._givenUp()) {
      return;
    }
    if (!this._clock.online()) {
      this._later(); // the 'online' event will nudge sooner
      return;
    }
    this.tries += 1;
    // Fails by going 'disconnected' again, after JupyterLab's own tries:
    // statusChanged schedules the next one.
    this._kernel.reconnect().catch(() => undefined);
  }

  private _later(): void {
    if (this._timer === undefined && !this._disposed) {
      this._timer = this._clock.setTimeout(() => this._tryNow(), this._delay);
      this._delay = Math.min(2 * this._delay, MAX_RETRY_MS);
    }
  }

  private _cancel(): void {
    if (this._timer !== undefined) {
      this._clock.clearTimeout(this._timer);
      this._timer = undefined;
    }
  }

  private _delay = FIRST_RETRY_MS;
  private _timer: unknown = undefined;
  private _disposed = false;
}
