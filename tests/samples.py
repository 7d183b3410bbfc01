"""Conversations the service tests send: one a scam e-mail fires on, one nothing fires on."""

SCAM = [
    {
        "role": "user",
        "content": "Is this e-mail real?\n\nSubject: You have WON $1,000,000!!!\n\n"
        "Dear Winner, CONGRATULATIONS! Your e-mail address has won ONE MILLION DOLLARS in our "
        "international lottery. To claim your FREE prize, send your bank account number, full "
        "name and a processing fee of $99 today. Act NOW, this offer expires in 24 hours! Click "
        "here to claim your cash: http://claim-prize.example",
    },
]
PLAIN = [
    {"role": "user", "content": "What time does the library open on Saturdays?"},
    {"role": "assistant", "content": "It opens at 10 a.m. on Saturdays and closes at 4 p.m."},
]
