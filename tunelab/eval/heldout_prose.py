"""Held-out prose for the `ppl` suite: everyday expository text written for tunelab, about nothing in its data.

The built-in corpora (`local:prose`, `local:code`, `local:qa`) are all read from Python's standard library
and the task families draw their words from it, so Python's own reference pages cannot be held-out text:
a run on `local:prose` trains on them. These paragraphs were written for this file (no source text was
copied) on subjects far from programming; tests/eval/test_eval_heldout.py checks that no word 8-gram of them
occurs in any built-in corpus, and `tunelab eval` checks each run's own sources the same way.
"""

PARAGRAPHS = (
    "Bread starts with four things: flour, water, salt and yeast. When the flour is wet, two of its proteins "
    "join into long elastic strands called gluten, and kneading lines those strands up so that the dough can "
    "stretch without tearing. The yeast eats a little of the sugar in the flour and breathes out carbon "
    "dioxide, which the gluten traps in thousands of small pockets. That is why a good dough rises slowly in "
    "a warm kitchen and why it sinks if it is left too long: the strands tire and the gas escapes. In the "
    "oven the water in the dough turns to steam, the pockets swell one last time, and the outside dries into "
    "a crust that browns as its sugars and proteins react. A baker who wants an open, chewy loaf uses more "
    "water and a longer, cooler rise; one who wants a soft sandwich loaf adds milk or butter, which shorten "
    "the strands and keep the crumb tender.",

    "A river does most of its work in a few days of the year. For months it runs low and clear, moving "
    "little more than sand, and then a week of heavy rain in the hills turns it brown and fast. During a "
    "flood the water can lift stones the size of a fist and roll boulders along the bed, and the outside of "
    "each bend is cut back while the inside collects a bar of gravel. Over many floods the bends wander "
    "across the valley floor. Now and then the river cuts through the narrow neck of a loop and leaves the "
    "old bend behind as a quiet, curved pond. Farmers have long valued the flat land that these floods "
    "build, because every high water leaves a thin layer of fine silt on the fields, but the same floods "
    "are the reason that old villages were built on the higher ground at the edge of the plain.",

    "Most people who take up running make the same mistake in their first month: they run every outing as "
    "fast as they can. The body adapts to training while it rests, not while it works, and muscles, "
    "tendons and bones do not all adapt at the same speed. The heart and lungs improve within weeks, so a "
    "new runner soon feels able to go further, but tendons need months to grow stronger, and that gap is "
    "where most injuries come from. Coaches therefore suggest that most runs be slow enough to hold a "
    "conversation, that the weekly distance grow by only a small step at a time, and that one week in four "
    "be lighter than the others. It feels too easy at first. A year later the runner who followed that "
    "advice is usually still running, and often faster than the one who did not.",

    "Before clocks were common, a town kept time by the sun. Noon was the moment when shadows were "
    "shortest, and every town's noon came a little earlier or later than its neighbour's, depending on how "
    "far east or west it lay. Nobody minded while travel was slow. The railways changed that. A timetable "
    "that listed a different local time at every station was a recipe for missed connections and, worse, "
    "for two trains on one track at once. Railway companies began to run all their trains on the time of a "
    "single city, and in the second half of the nineteenth century countries agreed on standard zones, each "
    "a whole number of hours from a reference line. People grumbled that the clock on the church no longer "
    "matched the sun, but within a generation the new hours felt natural.",

    "Keeping a small vegetable garden teaches patience in a very practical way. Seeds sown in cold soil "
    "simply wait, so the gardener who plants beans too early gains nothing and often loses the seed to rot. "
    "Tomatoes want a long warm season and full sun; lettuce prefers the cooler weeks of spring and autumn "
    "and turns bitter in midsummer heat. Watering deeply twice a week is better than a light sprinkle every "
    "evening, because deep water draws the roots down where the soil stays moist. A layer of straw or "
    "shredded leaves over the bed keeps the ground cool, holds the water in and smothers most weeds. At the "
    "end of the season, turning the old plants into compost returns much of what they took from the soil, "
    "and the next spring the beds are darker and easier to dig.",

    "A good map leaves most things out. The person who draws a map for hikers keeps the paths, the streams, "
    "the steep slopes and the places to find water, and drops the shops and the bus routes that a city map "
    "would show. Every map also has to flatten a round earth onto a sheet of paper, and no way of doing that "
    "keeps both the shapes and the sizes of large areas true at once. A chart made for sailors keeps angles "
    "correct so that a straight line on it is a steady compass course, at the price of making lands near the "
    "poles look far larger than they are. Reading a map well means knowing what its maker chose to keep, "
    "what was left out, and why.",

    "Bees do not make honey for us. A colony of honeybees stores it as food for the winter, when there are no "
    "flowers to visit. Foragers collect nectar, a thin sweet liquid, and carry it home in a special stomach. "
    "In the hive, younger workers pass it from mouth to mouth, adding enzymes that split its sugars, and "
    "spread it in thin layers over the wax cells. The bees then fan their wings to move warm air across the "
    "comb until most of the water has gone, and only when the honey is thick enough to keep without "
    "spoiling do they seal each cell with a cap of wax. A beekeeper who takes honey must leave the colony "
    "enough to last until spring, or feed it sugar syrup in its place.",

    "Learning a second language as an adult is slow at the start and then, for many people, surprisingly "
    "quick. The first months are spent on sounds that do not exist in one's own language and on a small set "
    "of very common words, which carry a large share of everyday speech. Listening comes before speaking: "
    "people understand far more than they can say, and that gap is normal. Regular short practice works "
    "better than a long weekly session, because memory is strengthened by being recalled just as it begins "
    "to fade. Mistakes are part of the process. The learner who talks with patient friends, reads simple "
    "stories and is not afraid to sound silly usually makes more progress than one who studies grammar "
    "tables alone.",
)
