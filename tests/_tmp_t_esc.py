import time
from test_tui import *
async def test_esc_timing(tiny_model):
    app = FmchatApp(tiny_settings(tiny_model, max_new_tokens=5000, ctx=None), persist=False)
    t0=time.perf_counter()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot); t1=time.perf_counter()
        await send(pilot, "Write a very long story")
        await wait_for(pilot, lambda: streaming(app), "streaming started"); t2=time.perf_counter()
        await pilot.press(*"next")
        await pilot.press("escape"); t3=time.perf_counter()
        await turn_done(pilot, 1); t4=time.perf_counter()
        app.query_one(ChatInput).clear()
        await app.workers.wait_for_complete(); t5=time.perf_counter()
    print(f"\nload {t1-t0:.2f} stream {t2-t1:.2f} keys {t3-t2:.2f} done {t4-t3:.2f} workers {t5-t4:.2f} exit {time.perf_counter()-t5:.2f}", app.session.messages[-1].stats.generated_tokens)
